"""Every bad input of the command line ends in one line `kvlib: error: ...`, exit 2 (130
on Ctrl-C), and no traceback. Checks that need no process of their own run through
`main(argv)`; argv bytes, pipes, /dev/full and signals run as a user would."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvlib.cli import main
from kvlib.model.files import default_model_path, weights_folder

LONG_PROMPT = "word " * 8200  # more tokens than the model's context of 8192


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvlib: error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD_INPUT = [
    (["generate", "x", "--temperature", "nan"], "argument --temperature: must be a finite"),
    (["generate", "x", "--temperature", "inf"], "argument --temperature: must be a finite"),
    (["generate", "x", "--temperature", "-1"], "argument --temperature: must be a finite"),
    (["generate", "x", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["generate", "x", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 0"),
    (["generate", "x", "--max-new-tokens", "five"], "argument --max-new-tokens: expected a"),
    (["generate", "x", "--top-p", "2", "--temperature", "1"], "argument --top-p: must be"),
    (["generate", "x", "--n", "3"], "--n 3 shares the prompt by forking its sequence; "
                                    "--cache contiguous cannot fork (use --cache paged)"),
    (["generate", "x", "--cache", "paged", "--block-size", "0"], "argument --block-size"),
    (["generate", "x", "--block-size", "8"], "--block-size applies only to --cache paged"),
    (["generate", "x", "--num-blocks", "8"], "--num-blocks applies only to --cache paged"),
    (["generate", "x", "--window", "8"], "--window applies only to --cache int8, int4"),
    (["generate", "x", "--symmetric"], "--symmetric applies only to --cache int8, int4"),
    (["generate", "x", "--top-k", "5"], "--top-k applies only when sampling"),
    (["generate", "x", "--seed", "3"], "--seed applies only when sampling"),
    (["generate", "x", "--cache", "none", "--backend", "numba"],
     "--backend numba has no kernel for --cache none"),
    (["generate", "x", "--cache", "int4", "--backend", "numba"],
     "--backend numba has no kernel for --cache int4"),
    (["generate", "x", "--batching", "padded", "--cache", "paged"], "--batching padded"),
    (["generate", "x", "--prefill-chunk", "4", "--cache", "none"], "--prefill-chunk"),
    (["generate", "x", "--prefill-chunk", "0"], "argument --prefill-chunk: must be >= 1"),
    (["generate", "ab\udcff"], "PROMPT 1 is not valid UTF-8"),
    (["generate", "x", ""], "PROMPT 2 is empty"),
    (["generate", "x", "--max-new-tokens", "100000000"],
     "past the model's context of 8192 (at most 8191 new tokens fit)"),
    (["generate", LONG_PROMPT, "--max-new-tokens", "1"], "past the model's context of 8192"),
    (["generate", "x", "--cache", "int4", "--group-size", "5"], "group size 5 does not divide"),
    (["perplexity", "--cache", "contiguous", "--window", "4"], "--window applies only to"),
    (["perplexity", "--chunk", "0"], "argument --chunk: must be >= 1"),
    (["memory", "--model", "llama-3-8b", "--tokens", "0"], "argument --tokens: must be >= 1"),
    (["bench", "attention", "--repeats", "0"], "argument --repeats: must be >= 1"),
    (["generate", "x", "--cache", "fast"], "argument --cache: invalid choice"),
    (["fly"], "argument command: invalid choice"),
]


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's errors, --help, --version
        return done.code


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a)[:40] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code = exit_code(argv)
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert message in one_line_error(out.err)


def test_text_files_that_are_not_utf8_text(tmp_path, capsys):
    latin1, binary = tmp_path / "latin1.txt", tmp_path / "blob.bin"
    latin1.write_bytes("café".encode("latin-1"))
    binary.write_bytes(bytes(range(256)))
    for path, message in ((latin1, "is not UTF-8 text (byte 0xe9 at offset 3)"),
                          (binary, "is a binary file"),
                          (tmp_path / "missing.txt", "cannot read --text"),
                          (tmp_path, "cannot read --text")):
        assert exit_code(["perplexity", "--text", str(path), "--quiet"]) == 2
        assert message in one_line_error(capsys.readouterr().err)
    long = tmp_path / "long.txt"
    long.write_text(LONG_PROMPT)
    assert exit_code(["perplexity", "--text", str(long), "--quiet"]) == 2
    assert "past the model's context of 8192; use a shorter text" in \
        one_line_error(capsys.readouterr().err)


def test_help_shows_defaults_and_version(capsys):
    assert exit_code(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 64)", "(default: contiguous)", "(default: 16)", "(default: 0.0)"):
        assert default in text
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvlib 0.1.0")


def run(*args, env=None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "kvlib", *args], stdout=stdout,
                          stderr=subprocess.PIPE, timeout=300, env=env)


def test_non_utf8_argv_bytes():
    out = run(b"generate", b"caf\xe9", b"--quiet")
    assert out.returncode == 2
    assert "PROMPT 1 is not valid UTF-8" in one_line_error(out.stderr.decode())


def test_unusable_cache_dir_names_kvlib_cache_dir(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    for value in ("", str(a_file / "sub")):
        out = run("generate", "x", "--quiet", env=os.environ | {"KVLIB_CACHE_DIR": value})
        assert out.returncode == 2
        assert "KVLIB_CACHE_DIR" in one_line_error(out.stderr.decode())
    assert list(tmp_path.iterdir()) == [a_file]  # nothing written anywhere else


def test_full_disk_and_closed_pipe_on_stdout():
    with open("/dev/full", "w") as full:
        out = run("generate", "The sky is", "--max-new-tokens", "2", "--quiet", stdout=full)
    assert out.returncode == 2
    assert "cannot write to stdout: No space left on device" in \
        one_line_error(out.stderr.decode())
    proc = subprocess.Popen([sys.executable, "-m", "kvlib", "generate", "The sky is",
                             "--max-new-tokens", "2", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 2
    assert "cannot write to stdout: Broken pipe" in one_line_error(err)


def _interruptible(argv, **kwargs) -> subprocess.Popen:
    """Start `python -m kvlib argv` with Ctrl-C's default action, as in a terminal: a
    job started in the background by a script inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "kvlib", *argv],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def _interrupt_when(proc, ready, timeout=240.0) -> None:
    start = time.monotonic()
    while not ready() and time.monotonic() - start < timeout and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_during_generation_exits_130():
    # a prompt this long shows a prefill progress bar on stderr: generation has begun
    proc = _interruptible(["generate", "word " * 600, "--max-new-tokens", "2000"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), b"")))
    reader.start()
    try:
        _interrupt_when(proc, lambda: b"prefill" in b"".join(err))
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()   # a failed run must not keep generating beside the next tests
    reader.join()
    text = b"".join(err).decode()
    assert "prefill" in text and "Traceback" not in text
    assert text.splitlines()[-1] == "kvlib: error: interrupted"


def test_ctrl_c_during_dequantization_exits_130_and_leaves_no_staging(tmp_path):
    env = os.environ | {"KVLIB_CACHE_DIR": str(tmp_path)}
    proc = _interruptible(["generate", "x", "--max-new-tokens", "1", "--quiet"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _interrupt_when(proc, lambda: any(".staging" in p.name for p in tmp_path.iterdir()))
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 130
    assert one_line_error(err) == "kvlib: error: interrupted"
    folder = weights_folder(default_model_path()).name
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{folder}.lock"]
