"""Fault injection on saving: ``fxzip merge --out`` interrupted (SIGINT, SIGKILL)
at several points of the save leaves ``--out`` holding the previous complete
result, byte for byte, or the new complete one, never a mix; the next run
cleans up what it left; two merges into one ``--out`` exclude each other;
``--out`` is checked before any work.

The interrupted runs are real ``python -m fxzip merge`` processes. The test
watches the filesystem and sends the signal when the save reaches a point:
the temporary folder appears, a file appears in it, the folder is renamed
into place. A run too fast for a point is still checked (the invariant holds
at every point). A small residual CNN from a ``mynets:make`` factory keeps
each merge to about a second.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import batches, prepared

import fxzip
from fxzip import result_dir
from fxzip.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STOP = "2"  # a partial zip (model.pt2), so the interrupted save differs from the full zip in place
FULL_FILES = ["correlation.png", "cuts.png", "model.safetensors", "report.json", "report.md"]
PARTIAL_FILES = ["correlation.png", "cuts.png", "model.pt2", "report.json", "report.md"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for these small convs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two checkpoints of a factory model, float input data, and a complete full
    zip written by ``fxzip merge`` (``old``), the result each test starts from."""
    root = tmp_path_factory.mktemp("faults")
    (root / "mynets.py").write_text(textwrap.dedent("""
        from fxzip.zoo import small_cnn

        def make(num_classes=10):
            return small_cnn(out_dim=num_classes, in_channels=3, width=16)
    """))
    sys.path.insert(0, str(root))
    sys.modules.pop("mynets", None)  # another test's mynets (other widths) may be cached in this worker
    import mynets

    data = batches((16, 3, 16, 16), 2)
    for seed in (0, 1):
        torch.save(prepared(mynets.make(num_classes=4), data, seed).state_dict(), root / f"m{seed}.pt")
    torch.save(torch.cat(data), root / "x.pt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(merge_args("old")) == 0
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in (root / "old").iterdir()) == FULL_FILES
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("mynets", None)


def merge_args(out: str | Path, *extra: str) -> list[str]:
    return ["merge", "m0.pt", "m1.pt", "--model", "mynets:make", "--num-classes", "4", "--data", "x.pt",
            "--batch-size", "16", "--out", str(out), "--quiet", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_old_or_new(out: Path, old: dict[str, bytes]) -> str:
    """``out`` is the old result byte for byte, or a complete new partial zip."""
    assert out.is_dir(), f"{out} is missing (leftovers: {leftovers(out)})"
    if snapshot(out) == old:
        return "old"
    assert sorted(p.name for p in out.iterdir()) == PARTIAL_FILES, "a mix of two results"
    assert result_dir.is_complete(out, result_dir.MERGE), "the new result is incomplete"
    return "new"


def _report_of(out: Path) -> bytes | None:
    try:
        return (out / "report.json").read_bytes()
    except OSError:  # between the renames of the fallback path
        return None


def default_sigint() -> None:
    """For a child that must see Ctrl-C as a user's terminal delivers it: a job
    started in the background of a shell without job control (``cmd &`` in a
    script, nohup) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler at all (the tests below would see no interrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fxzip", *merge_args(out, "--stop-at", STOP)], cwd=root,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """Poll until ``ready()`` (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return ready()
        time.sleep(0.001)
    raise AssertionError("the merge neither reached the point nor ended")


# (signal, point): the temporary folder appears; a file appears in it (cuts.png comes after model.pt2 and the
# plot, report.md just before report.json, the last); the new result has taken out's place (swapped in, the
# old one perhaps not yet removed)
POINTS = [(signal.SIGINT, "stage"), (signal.SIGKILL, "cuts.png"), (signal.SIGINT, "report.md"),
          (signal.SIGKILL, "in place")]


@pytest.mark.parametrize("sig, point", POINTS, ids=[f"{s.name}-{p}" for s, p in POINTS])
def test_an_interrupted_save_leaves_the_old_result_or_the_new_one(root, tmp_path, sig, point):
    out = tmp_path / "out"
    shutil.copytree(root / "old", out)
    old = snapshot(out)
    proc = start(root, out)
    stage = tmp_path / f".out.tmp-{proc.pid}"
    def ready() -> bool:
        if point == "stage":
            return stage.exists()
        if point == "in place":  # the new result has taken out's place
            return _report_of(out) not in (None, old.get("report.json"))
        return (stage / point).exists()

    hit = wait_for(proc, ready)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT and hit and proc.returncode != 0:
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    got = assert_old_or_new(out, old)
    if hit and point == "stage":  # killed long before the rename (model.pt2 is being exported)
        assert got == "old"  # the previous result, untouched; later points may race with the rename
    if hit and point == "in place":  # once the new result is in place, a kill cannot bring the old one back
        assert got == "new"
    if sig == signal.SIGINT:  # the process cleaned up after itself
        assert leftovers(out) == []
    recovered(out, old, got)


def recovered(out: Path, old: dict[str, bytes], got: str) -> None:
    """The next writer cleans up (under the lock, which it removes when done), and the folder loads."""
    with result_dir.lock(out):
        result_dir.recover(out)
    assert leftovers(out) == [] and assert_old_or_new(out, old) == got
    loaded = fxzip.load(out, model="mynets:make") if got == "old" else fxzip.load(out)
    assert loaded(torch.randn(2, 3, 16, 16)) is not None


def test_a_following_run_restores_or_cleans_leftovers_and_stores_the_weights_once(root, tmp_path, capsys,
                                                                                  monkeypatch):
    """An old result moved aside with nothing in place (a kill between the two
    renames where the folders cannot be swapped in one) is restored, a temporary
    folder removed; then the new partial zip replaces it: no
    state_dict.safetensors, files with the umask's mode, and
    ``fxzip.load(DIR, model=gm)`` loads the program's weights."""
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    shutil.copytree(root / "old", tmp_path / ".out.old-99999")
    (tmp_path / ".out.tmp-99998").mkdir()
    (tmp_path / ".out.tmp-99998" / "model.pt2").write_bytes(b"PK\x03\x04 truncated")
    before = os.umask(0o002)  # group-writable: safetensors' own mode would differ
    try:
        assert main(merge_args(out, "--stop-at", STOP)) == 0
    finally:
        os.umask(before)
    err = capsys.readouterr().err
    assert "restored the previous result" in err and "removed .out.tmp-99998" in err
    assert leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == PARTIAL_FILES  # the weights once, in model.pt2
    assert result_dir.is_complete(out, result_dir.MERGE)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o664}, modes
    assert out.stat().st_mode & 0o777 == 0o775
    import mynets

    models = [mynets.make(num_classes=4) for _ in range(2)]
    for seed, model in enumerate(models):
        model.load_state_dict(torch.load(root / f"m{seed}.pt"))
    data = list(torch.split(torch.load(root / "x.pt"), 16))
    gm = fxzip.merge(*models, data=data, progress=False, stop_at=int(STOP), method="weight_average")
    assert fxzip.load(out, model=gm) is gm
    program = fxzip.load(out)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gm(x), program(x)))
    # a folder of an earlier version, with the weights also in state_dict.safetensors, still loads from there
    from safetensors.torch import save_file

    older = tmp_path / "older"
    shutil.copytree(out, older)
    save_file({k: v.contiguous() for k, v in gm.state_dict().items()}, str(older / "state_dict.safetensors"))
    again = fxzip.merge(*models, data=data, progress=False, stop_at=int(STOP), method="permute")
    assert fxzip.load(older, model=again) is again
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(x), again(x)))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gm(x), fxzip.load(older)(x)))


def test_a_second_merge_into_the_same_out_fails_at_once(root, tmp_path):
    """While one writer holds --out's lock (this process, as a merge in progress
    does from its argument checks to the swap), a second ``fxzip merge`` into the
    same --out fails at once with one line naming the holder, and leaves the
    result alone; once the lock is released the same command succeeds. (The lock
    is re-entrant within one process, so the second merge is a subprocess.)"""
    out = tmp_path / "out"
    shutil.copytree(root / "old", out)
    old = snapshot(out)
    with result_dir.lock(out):
        t = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "fxzip", *merge_args(out, "--stop-at", STOP)], cwd=root,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another fxzip is writing to {out} (pid {os.getpid()}); wait for it or choose another --out" \
            in second.stderr
        assert second.stderr.count("\n") == 1  # one line, before any model was built
        assert time.monotonic() - t < 60  # no merge ran: an interpreter start, the checks, the lock
        assert snapshot(out) == old
    again = subprocess.run([sys.executable, "-m", "fxzip", *merge_args(out, "--stop-at", STOP)], cwd=root, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert assert_old_or_new(out, old) == "new"
    assert leftovers(out) == []


def test_a_foreign_folder_is_refused_without_overwrite(root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "report.json").write_text("{}")  # fxzip's name, not fxzip's content
    t = time.monotonic()
    assert main(merge_args(out)) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t < 5 and err.count("\n") == 1
    assert str(out) in err and "notes.txt" in err and "--overwrite" in err and "not an fxzip merge result" in err
    assert snapshot(out) == {"notes.txt": b"keep me", "report.json": b"{}"}
    # an earlier result with a file of the user's beside it is not replaced silently either
    shutil.rmtree(out)
    shutil.copytree(root / "old", out)
    (out / "notes.txt").write_text("mine")
    assert main(merge_args(out)) == 2
    assert "with other files too (notes.txt)" in capsys.readouterr().err
    assert main(merge_args(out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == FULL_FILES
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as report.json


@pytest.mark.parametrize("case", ["file", "under a file", "holds an input"])
def test_an_out_that_cannot_be_written_fails_before_any_work(root, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(root)
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under a file": tmp_path / "f" / "sub" / "out", "holds an input": root}[case]
    t = time.monotonic()
    assert main(merge_args(out, "--overwrite", "--stop-at", "1")) == 2
    err = capsys.readouterr().err
    message = {"file": "exists and is not a directory", "under a file": f"cannot be created: {tmp_path / 'f'} is a "
               "file", "holds an input": "which a result must not replace"}[case]
    assert message in err and err.count("\n") == 1 and "building" not in err, err
    assert time.monotonic() - t < 5
    assert (tmp_path / "f").read_text() == "x" and (root / "old").is_dir()


def test_results_are_replaced_in_one_rename_where_folders_cannot_be_swapped(tmp_path, monkeypatch):
    """Without renameat2's exchange the old result is moved aside, the new one
    renamed in and the old removed; ``recover`` judges each leftover."""
    kind = result_dir.SWEEP
    out = tmp_path / "sweep"

    def write(text: str) -> None:
        with result_dir.writing(out, kind) as stage:
            (stage.path / "sweep.csv").write_text(text)
            (stage.path / "sweep.json").write_text(
                '{"settings": {"command": "fxzip sweep"}, "manifest": %s}'
                % str(stage.manifest()).replace("'", '"'))

    write("first")
    monkeypatch.setattr(result_dir, "_exchange", lambda a, b: False)
    write("second")
    assert (out / "sweep.csv").read_text() == "second" and leftovers(out) == []
    assert result_dir.is_complete(out, kind)
    # killed between the two renames: nothing in place, the old result aside
    os.rename(out, tmp_path / ".sweep.old-1")
    assert result_dir.recover(out) and (out / "sweep.csv").read_text() == "second" and leftovers(out) == []
    # killed after the new result was in place: the old one aside is removed
    shutil.copytree(out, tmp_path / ".sweep.old-2")
    result_dir.recover(out)
    assert leftovers(out) == [] and (out / "sweep.csv").read_text() == "second"
    # an exception while writing leaves the result as it was
    with pytest.raises(KeyError):
        with result_dir.writing(out, kind) as stage:
            (stage.path / "sweep.csv").write_text("half")
            raise KeyError("interrupted")
    assert (out / "sweep.csv").read_text() == "second" and leftovers(out) == []


SWALLOWED_CTRL_C = """\
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("result_dir", sys.argv[1])  # without importing torch
module = sys.modules["result_dir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

def write(text, swallow=False):
    with module.writing(sys.argv[2], module.SWEEP, overwrite=True) as stage:
        (stage.path / "sweep.csv").write_text(text)
        if swallow:
            try:  # what a __del__ or a library's `except BaseException` does to a Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                pass
        manifest = str(stage.manifest()).replace("'", '"')
        (stage.path / "sweep.json").write_text('{"settings": {"command": "fxzip sweep"}, "manifest": %s}' % manifest)

write("old")
try:
    write("new", swallow=True)
except KeyboardInterrupt:
    print("interrupted")
print(open(os.path.join(sys.argv[2], "sweep.csv")).read())
"""


def test_a_swallowed_ctrl_c_still_stops_the_result_from_changing(tmp_path):
    """A Ctrl-C raised where some code swallows it must not let the save finish:
    the result stays the old one and the interrupt comes back at the commit."""
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-c", SWALLOWED_CTRL_C, result_dir.__file__, str(out)], env=ENV,
                          capture_output=True, text=True, timeout=60, preexec_fn=default_sigint)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "old"] and leftovers(out) == []


LOCK_ONLY = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("result_dir", sys.argv[1])  # without importing torch
module = sys.modules["result_dir"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.lock(sys.argv[2]):
    pass
"""


def test_sweep_outputs_are_written_atomically_and_refuse_a_foreign_folder(tmp_path):
    from fxzip.cli.sweep import SweepRow, write_outputs

    rows = [SweepRow("original", None, None, None, "original", 0, 4, [0.9, 0.8]),
            SweepRow("zipit", 0.5, 0.5, None, "full", 4, 4, [0.7, 0.6], 1e6, 1.0)]
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "data.csv").write_text("mine")
    with pytest.raises(ValueError, match="not an fxzip sweep result.*data.csv.*--overwrite"):
        write_outputs(rows, out, {"command": "fxzip sweep"})
    assert write_outputs(rows, out, {"command": "fxzip sweep"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert result_dir.is_complete(out, result_dir.SWEEP)
    write_outputs(rows[:1] + rows, out, {"command": "fxzip sweep"})  # an earlier sweep is replaced
    assert result_dir.is_complete(out, result_dir.SWEEP) and leftovers(out) == []
    with result_dir.lock(out):  # a second writer (another process) fails at once
        proc = subprocess.run([sys.executable, "-c", LOCK_ONLY, result_dir.__file__, str(out)], env=ENV,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"another fxzip is writing to {out} (pid {os.getpid()})" in proc.stderr


def test_a_closed_pipe_ends_the_command_quietly(root, monkeypatch, capsys):
    """``fxzip inspect --json | head -1``: the reader has gone; no BrokenPipeError."""
    read, write = os.pipe()
    os.close(read)
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main(["inspect", "--model", "mynets:make", "--img-size", "16", "--json"]) == 141
    finally:
        monkeypatch.undo()
        stdout.close()  # now devnull: nothing left to fail
    assert capsys.readouterr().err == ""
