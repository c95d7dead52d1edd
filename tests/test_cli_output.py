"""Output is never thrown away: streamed to a terminal, one header per completion, early
stops reported with their tokens kept."""

import io
import json

from kvlib.cli import main


class Terminal(io.StringIO):
    """A stdout that says it is a terminal and remembers every write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_terminal_gets_the_tokens_as_they_come(monkeypatch, capsys):
    args = ["generate", "The sky is", "--max-new-tokens", "4", "--quiet"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(args) == 0
    assert terminal.getvalue() == plain  # the same text ...
    pieces = [w for w in terminal.writes if w.strip()]
    assert len(pieces) >= 3                # ... written piece by piece, not at the end


def test_several_completions_get_headers_and_early_stops_keep_their_tokens(capsys):
    args = ["generate", "The sky is", "Name a color.", "--max-new-tokens", "12",
            "--cache", "paged", "--block-size", "4", "--num-blocks", "3"]
    assert main([*args, "--quiet"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "--- completion 1 of 2 (prompt 1) ---"
    assert "--- completion 2 of 2 (prompt 2) ---" in lines
    assert "stopped early" in err and "finish_reason cache_full" in err
    assert main([*args, "--quiet", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["The sky is", "Name a color."]
    assert "cache_full" in {r["finish_reason"] for r in rows}
    assert all(len(r["token_ids"]) >= 1 for r in rows)
