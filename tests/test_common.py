import os
import stat
import time

import pytest
import torch

from lattice_lab.common.cli import friendly_errors
from lattice_lab.common.device import resolve_device, resolve_dtype
from lattice_lab.common.errors import ConfigError
from lattice_lab.common.io import atomic_path, atomic_torch_save, atomic_write_text
from lattice_lab.lattice import checkerboard, gather_offsets, nn_sum, translate


def test_atomic_write_replaces_and_keeps_target_on_error(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o044, f"file should be readable by group/others under the default umask, got {oct(mode)}"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"], "temporary file left behind"
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_device_and_dtype_errors_name_the_value():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("float64") is torch.float64
    with pytest.raises(ConfigError, match="'float8'"):
        resolve_dtype("float8")


@pytest.mark.parametrize("cuda_present", [False, True])
@pytest.mark.parametrize("spec", ["cuda:abc", "cuda:", "cuda:-1", "cuda0", "cudax", "cuda:0:1"])
def test_a_malformed_device_is_named_with_the_accepted_forms(monkeypatch, spec, cuda_present):
    """``device=cuda:abc`` was reported as 'CUDA is not available' (and taken as a device where CUDA is)."""
    import re

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda_present))
    with pytest.raises(ConfigError, match=rf"^device={re.escape(repr(spec))}: expected 'auto', 'cpu', 'cuda' or "
                                          r"'cuda:N' \(N: a GPU index"):
        resolve_device(spec)


def test_a_gpu_index_the_machine_does_not_have_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("CUDA") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^ed_device='cuda:2': this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2", key="ed_device")


def test_model_dtypes_refuse_half_precision_by_name():
    from lattice_lab.common.device import MODEL_DTYPES

    assert resolve_dtype("float32", MODEL_DTYPES) is torch.float32 and resolve_dtype(torch.float64, MODEL_DTYPES)
    for bad in ("bfloat16", torch.float16):
        with pytest.raises(ConfigError, match=r"^dtype='(bfloat16|float16)': expected one of \['float32', 'float64'\]$"):
            resolve_dtype(bad, MODEL_DTYPES)
    with pytest.raises(ConfigError, match=r"^integrator_dtype='float16'"):
        resolve_dtype("float16", MODEL_DTYPES, key="integrator_dtype")
    assert resolve_dtype("bfloat16") is torch.bfloat16  # the default table keeps them (e.g. a matmul ceiling)


def test_friendly_errors_prints_one_line_and_exits_2(capsys):
    @friendly_errors
    def task():
        raise ConfigError("hamiltonian.kappa=0.3: need |kappa| < k/4 = 0.25")

    with pytest.raises(SystemExit) as exc:
        task()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: hamiltonian.kappa=0.3: need |kappa| < k/4 = 0.25"


def test_friendly_errors_reports_a_path_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")

    @friendly_errors
    def task():
        atomic_write_text(blocker / "out" / "config.yaml", "x")  # output_root below a regular file

    with pytest.raises(SystemExit) as exc:
        task()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {blocker}") and len(err.splitlines()) == 1

    @friendly_errors
    def bug():
        raise OSError("no file named")  # not about a path: a real failure keeps its traceback

    with pytest.raises(OSError):
        bug()


def test_periodic_helpers_match_explicit_indexing():
    g = torch.Generator().manual_seed(1)
    L = 5
    f = torch.randn(2, L, L, generator=g, dtype=torch.float64)
    nn = nn_sum(f)
    x, y = 1, 4
    expect = f[:, (x + 1) % L, y] + f[:, (x - 1) % L, y] + f[:, x, (y + 1) % L] + f[:, x, (y - 1) % L]
    assert torch.allclose(nn[:, x, y], expect)
    offsets = torch.tensor([[0, 0], [2, -1], [-3, 3]])
    env = gather_offsets(f, offsets)
    for m, (dx, dy) in enumerate(offsets.tolist()):
        assert torch.equal(env[:, x, y, m], f[:, (x + dx) % L, (y + dy) % L])
    assert torch.equal(translate(f, (1, 2))[:, (x + 1) % L, (y + 2) % L], f[:, x, y])
    cb = checkerboard(4)
    assert cb[0, 0] == 1 and cb[0, 1] == -1 and cb[1, 1] == 1 and cb.sum() == 0


def test_periodic_band_is_a_slice_of_the_padded_lattice():
    from lattice_lab.symmetry.field_ops import periodic_band, periodic_pad

    x = torch.randn(2, 1, 7, 7)
    for r0, r1, pad in [(0, 7, 3), (2, 5, 3), (6, 7, 2), (0, 1, 9)]:
        torch.testing.assert_close(periodic_band(x, r0, r1, pad), periodic_pad(x, pad)[..., r0:r1 + 2 * pad, :],
                                   atol=0, rtol=0)


def test_run_pieces_on_threads():
    from lattice_lab.common.threads import run_pieces, shutdown_pool

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.zeros(6)
        seen = []

        def piece(i):
            def run():
                seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
                out[i] = torch.ones(3).sum() * i  # each piece writes its own result
            return run

        with torch.no_grad():
            run_pieces([piece(i) for i in range(6)], 2)
        assert out.tolist() == [3.0 * i for i in range(6)]
        assert set(seen) == {(1, False, False)}  # one torch thread each, the caller's grad mode
        assert torch.get_num_threads() == 2  # the caller's setting is untouched
        seen.clear()
        with torch.inference_mode():
            run_pieces([piece(0), piece(1)], 2)
        assert set(seen) == {(1, True, False)}

        def bad():
            raise ValueError("piece 3 failed")

        with pytest.raises(ValueError, match="piece 3 failed"):
            run_pieces([piece(0), bad, piece(2)], 2)
        calls = []
        run_pieces([lambda: calls.append(torch.get_num_threads())], 1)  # sequential, in this thread
        assert calls == [2]
        run_pieces([lambda: calls.append(torch.get_num_threads())], 2)  # one piece, on a pool thread
        assert calls == [2, 1]
    finally:
        torch.set_num_threads(previous)
        shutdown_pool()


def test_tune_malloc_is_idempotent_and_can_be_disabled(monkeypatch):
    from lattice_lab.common import allocator

    monkeypatch.setitem(allocator._state, "tuned", None)
    monkeypatch.setenv("LATTICE_LAB_MALLOC", "default")
    assert allocator.tune_malloc() is False  # disabled: glibc defaults kept
    monkeypatch.setitem(allocator._state, "tuned", None)
    monkeypatch.delenv("LATTICE_LAB_MALLOC")
    first = allocator.tune_malloc()
    assert isinstance(first, bool) and allocator.tune_malloc() is first
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_piece_pool_works_in_a_forked_child():
    from lattice_lab.common.threads import run_pieces, shutdown_pool

    out = torch.zeros(2)
    try:
        run_pieces([lambda: out.__setitem__(0, 1.0), lambda: out.__setitem__(1, 2.0)], 2)  # pool exists
        pid = os.fork()
        if pid == 0:  # child: the parent's pool threads are gone; a new pool must run the pieces
            code = 1
            try:
                res = torch.zeros(2)
                run_pieces([lambda: res.__setitem__(0, 3.0), lambda: res.__setitem__(1, 4.0)], 2)
                code = 0 if res.tolist() == [3.0, 4.0] else 1
            finally:
                os._exit(code)
        import signal
        import time

        deadline, status = time.monotonic() + 60.0, None
        while status is None and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            status = st if done else None
            time.sleep(0.02)
        if status is None:  # the child hangs on the parent's dead pool threads
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("run_pieces hangs in a forked child")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert out.tolist() == [1.0, 2.0]
    finally:
        shutdown_pool()


def test_switches_and_cuda_graph_choice():
    from lattice_lab.common.cuda_graph import wanted
    from lattice_lab.common.switch import check_switch

    assert [check_switch(v, "k") for v in ("auto", True, False)] == ["auto", True, False]
    with pytest.raises(ConfigError, match=r"cuda_graph='yes'"):
        check_switch("yes", "cuda_graph")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not any(wanted(s, cpu) for s in ("auto", True, False))  # nothing to record on a CPU
    assert wanted("auto", gpu) and not wanted("auto", gpu, auto=False) and wanted(True, gpu, auto=False)
    assert not wanted(False, gpu)


@pytest.mark.parametrize("bad", ["no", "yes", "false", 0, 1, None, "auto"])
def test_check_flag_refuses_non_booleans(bad):
    from lattice_lab.common.switch import check_flag

    assert check_flag(True, "overwrite") is True and check_flag(False, "overwrite") is False
    with pytest.raises(ConfigError, match=r"^overwrite=.*expected true or false"):
        check_flag(bad, "overwrite")


@friendly_errors
def _ctrl_c():
    """A run that the user stops with Ctrl-C."""
    raise KeyboardInterrupt


def test_friendly_errors_turns_an_interrupt_into_one_line_and_exit_130(capsys, monkeypatch):
    import signal

    from lattice_lab.common import cli
    from lattice_lab.common.errors import Interrupted

    with pytest.raises(SystemExit) as exc:
        _ctrl_c()
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(cli, "_job_name", lambda: "simulate")  # inside `python -m lattice_lab.simulate`
    with pytest.raises(SystemExit):
        _ctrl_c()
    assert capsys.readouterr().err.startswith("interrupted: rerun with resume=true to continue")
    monkeypatch.undo()

    @friendly_errors
    def saved_and_stopped():  # a run that saved its state says where and how to continue
        raise Interrupted("stopped at step 1200 of 4000, checkpoint runs/trajectories/x/checkpoint.pt; "
                          "resume=true continues")

    with pytest.raises(SystemExit) as exc:
        saved_and_stopped()
    assert exc.value.code == 130, "Interrupted is an interruption, not a user error (exit 2)"
    err = capsys.readouterr().err
    assert err == ("interrupted: stopped at step 1200 of 4000, checkpoint runs/trajectories/x/checkpoint.pt; "
                   "resume=true continues\n")

    previous = signal.getsignal(signal.SIGTERM)

    @friendly_errors
    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the run")

    with pytest.raises(SystemExit) as exc:
        terminated()
    assert exc.value.code == 143
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is previous, "the previous SIGTERM handler must be restored"


def test_dataset_build_shows_one_bar_per_phase_with_its_own_count(tmp_path, monkeypatch):
    """The quench phase costs snapshot_every ED solves per config, the random phase one: a single bar over both
    promised the random phase's rate for the whole build (~5 min shown for a 2-3 h holstein_L40)."""
    import io

    from hydra import compose, initialize_config_dir

    from lattice_lab.common import progress as P
    from lattice_lab.common.cli import CONFIG_DIR
    from lattice_lab.data import generation

    monkeypatch.setenv("LATTICE_LAB_NO_PROGRESS", "0")
    buf = io.StringIO()
    bar = P.progress(total=10, desc="work a", file=buf, initial=3, mininterval=0)  # a resumed first phase
    bar.update(7)
    P.start_phase(bar, "work b", 4, done=1)
    assert (bar.n, bar.total, bar.initial, bar.desc) == (1, 4, 1, "work b")
    bar.close()
    assert "work b:  25%" in buf.getvalue()
    assert "-" not in buf.getvalue().replace("work a", "").replace("work b", "")  # no negative rate or time

    bars, phases = [], []

    def recording_progress(**kw):
        bars.append(P.progress(file=io.StringIO(), **kw))
        return bars[-1]

    def recording_start_phase(bar, desc, total, done=0):
        phases.append((bar.desc, bar.n, bar.total, bar.postfix))  # the phase that ends here
        P.start_phase(bar, desc, total, done)

    monkeypatch.setattr(generation, "progress", recording_progress)
    monkeypatch.setattr(generation, "start_phase", recording_start_phase)
    with initialize_config_dir(config_dir=CONFIG_DIR):
        cfg = compose("generate", overrides=["dataset=holstein_L8_tiny", f"dataset.path={tmp_path / 'd.h5'}",
                                             "device=cpu"])
    generation.build_dataset(cfg)
    assert phases == [("ED holstein_L8_tiny (L=8) random", 12, 12, "then 12 quench configs, 3 ED solves each")]
    assert len(bars) == 1 and (bars[0].desc, bars[0].n, bars[0].total) == ("ED holstein_L8_tiny (L=8) quench", 12, 12)


def test_stop_requests_leave_ignored_and_foreign_handlers_alone():
    """A job started with & from a script ignores Ctrl-C; submitit handles SIGTERM itself: neither changes."""
    import signal

    from lattice_lab.common.interrupts import StopRequests

    def foreign(signum, frame):  # someone else's handler (not marked as one that interrupts)
        pass

    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, foreign)
    try:
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is foreign
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_stop_requests_second_signal_goes_to_the_handler_before():
    """The first SIGTERM asks for a stop at the next safe point; the second is handled as if the run had not
    asked (here a marked handler that records it and interrupts, as friendly_errors' SIGTERM handler does)."""
    import signal

    from lattice_lab.common.interrupts import StopRequests, interrupting

    seen = []

    @interrupting
    def recording(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, recording)
    try:
        with pytest.raises(KeyboardInterrupt), StopRequests() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert (stop.signal, stop.signum, seen) == ("SIGTERM", signal.SIGTERM, [])
            signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is recording
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_reader_lock_writes_nothing(tmp_path):
    from lattice_lab.common.io import run_lock

    with run_lock(tmp_path, "reader", shared=True), run_lock(tmp_path, "another reader", shared=True):
        pass
    assert list(tmp_path.iterdir()) == []  # a run made before locks: read without creating .lock
    with run_lock(tmp_path, "writer"):
        with pytest.raises(ConfigError, match="^reader: .* in use by another process"), run_lock(tmp_path, "reader", shared=True):
            pass
    with run_lock(tmp_path, "reader", shared=True), pytest.raises(ConfigError, match="^writer: "), run_lock(tmp_path, "writer"):
        pass


def test_progress_bars_redraw_rarely_into_a_log_file(monkeypatch):
    """A cluster job's log gets a line per redraw: once a minute there, every 0.5 s on a terminal."""
    import io

    from lattice_lab.common import progress as P

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("LATTICE_LAB_PROGRESS_INTERVAL", raising=False)
    monkeypatch.setenv("LATTICE_LAB_NO_PROGRESS", "0")
    assert P.progress(total=3, file=io.StringIO()).mininterval == P.LOG_INTERVAL_S == 60.0
    assert P.progress(total=3, file=Terminal()).mininterval == P.TERMINAL_INTERVAL_S == 0.5
    monkeypatch.setattr("sys.stderr", io.StringIO())  # tqdm's default stream
    assert P.update_interval() == 60.0
    monkeypatch.setenv("LATTICE_LAB_PROGRESS_INTERVAL", "5")
    assert P.progress(total=3, file=Terminal()).mininterval == 5.0
    monkeypatch.delenv("LATTICE_LAB_PROGRESS_INTERVAL")
    log = io.StringIO()  # a log file: a status text every call does not redraw the bar
    bar = P.progress(total=500, file=log)
    assert bar.maxinterval >= 60.0  # nor does tqdm's monitor thread every 10 s
    for i in range(500):
        P.set_status(bar, f"{i} site-steps/s")
        bar.update(1)
    bar.close()
    assert log.getvalue().count("\r") <= 3 and "499 site-steps/s" in log.getvalue()  # start, end (and close)
    for bad in ("abc", "-1", "nan"):
        monkeypatch.setenv("LATTICE_LAB_PROGRESS_INTERVAL", bad)
        with pytest.raises(ConfigError, match=f"LATTICE_LAB_PROGRESS_INTERVAL='{bad}'"):
            P.update_interval()


def test_available_memory_and_the_refusal_naming_the_settings(tmp_path, monkeypatch):
    """common/memory.py: MemAvailable of /proc/meminfo on the CPU (None where it cannot be read: then nothing is
    refused); an estimate above it is a ConfigError naming the settings that set the size and both amounts."""
    from lattice_lab.common import memory

    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:    2000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(fake))
    assert memory.available_bytes("cpu") == 2000000 * 1024
    memory.require_memory(2000000 * 1024, "cpu", {"dynamics.L": 8})  # fits exactly
    with pytest.raises(ConfigError, match=r"^dynamics.L=100000, dynamics.replicas=4: needs ~320 GB on cpu for "
                                          r"Q and V, 2.05 GB available$"):
        memory.require_memory(3.2e11, "cpu", {"dynamics.L": 100000, "dynamics.replicas": 4}, "Q and V")
    with pytest.raises(ConfigError, match=r"^dataset.configurations=10: needs ~5,000 GB on cpu, 2.05 GB available$"):
        memory.require_memory(5e12, torch.device("cpu"), {"dataset.configurations": 10})
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "missing"))
    assert memory.available_bytes("cpu") is None
    memory.require_memory(1e30, "cpu", {"dynamics.L": 8})  # not known: not refused
    if torch.cuda.is_available():
        assert memory.available_bytes("cuda") == torch.cuda.mem_get_info()[0]


def test_a_reader_that_waits_gets_the_lock_once_the_writer_is_done(tmp_path):
    """``wait=True`` (a comparison reading a shared ED run that another run is extending) blocks instead of
    refusing."""
    import threading

    from lattice_lab.common.io import run_lock

    got, errors = threading.Event(), []

    def reader():
        try:
            with run_lock(tmp_path, "reader", shared=True, wait=True):
                got.set()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with run_lock(tmp_path, "writer"):
        thread = threading.Thread(target=reader)
        thread.start()
        assert not got.wait(0.2) and not errors  # held by the writer
    thread.join(30)
    assert got.is_set() and not errors, errors


def test_seeding_takes_64_bit_seeds_and_rng_states_round_trip():
    """numpy takes 32-bit seeds: a run's 64-bit seed seeds it modulo 2^32; a captured state restores every stream."""
    import random

    import numpy as np

    from lattice_lab.common.seeding import rng_state, seed_everything, set_rng_state

    seed_everything(2**40 + 5)
    first = np.random.rand()
    np.random.seed(5)
    assert np.random.rand() == first
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_a_single_gpu_machine_is_named_as_such(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^device='cuda:1': this machine has 1 CUDA device \(cuda:0\)$"):
        resolve_device("cuda:1")


def test_run_pieces_runs_as_many_pieces_at_once_as_workers_after_a_smaller_pool():
    """The pool is rebuilt for another number of workers: 3 pieces that wait for each other all run at once."""
    import threading

    from lattice_lab.common.threads import run_pieces, shutdown_pool

    try:
        run_pieces([lambda: None, lambda: None], 2)
        barrier = threading.Barrier(3, timeout=20)
        run_pieces([barrier.wait] * 3, 3)  # BrokenBarrierError if fewer than 3 threads run them
    finally:
        shutdown_pool()


def test_interrupted_by_a_signal_exits_128_plus_it_and_the_next_run_starts_afresh(capsys):
    """A run that caught SIGTERM itself and saved raises Interrupted(signum=SIGTERM): exit 143; a later run in the
    same process interrupted by Ctrl-C exits 130, not the SIGTERM of the run before."""
    import signal

    from lattice_lab.common.errors import Interrupted

    @friendly_errors
    def stopped():
        raise Interrupted("stopped at step 5, resume=true continues", signum=signal.SIGTERM)

    with pytest.raises(SystemExit) as exc:
        stopped()
    assert exc.value.code == 143
    assert capsys.readouterr().err == "interrupted (SIGTERM): stopped at step 5, resume=true continues\n"
    with pytest.raises(SystemExit) as exc:
        _ctrl_c()
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_friendly_errors_leaves_someone_elses_sigterm_handler_alone():
    """submitit handles SIGTERM itself (requeue): the run must not replace its handler."""
    import signal

    def foreign(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, foreign)
    try:
        assert friendly_errors(lambda: signal.getsignal(signal.SIGTERM))() is foreign
        assert signal.getsignal(signal.SIGTERM) is foreign
    finally:
        signal.signal(signal.SIGTERM, before)


def test_hydra_errors_gives_back_the_environment_after_a_run_in_this_process(monkeypatch):
    """It sets HYDRA_FULL_ERROR=1 while the run is under way; a later run in the process (tests, the demo's stages)
    must not inherit it as the user's setting."""
    from lattice_lab.common import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv(cli._USER_FULL_ERROR, raising=False)
    assert cli.hydra_errors(lambda: os.environ.get("HYDRA_FULL_ERROR"))() == "1"
    assert "HYDRA_FULL_ERROR" not in os.environ and cli._USER_FULL_ERROR not in os.environ


def test_stop_requests_stand_in_for_pythons_ctrl_c_handler_and_give_it_back(capsys):
    """Under Python's own SIGINT handler (every run from a terminal) Ctrl-C becomes a stop request; on the way out
    the handlers before are back."""
    import signal

    from lattice_lab.common.interrupts import StopRequests

    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: a request
            assert stop.signal == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])
    assert "SIGINT: stopping at the next safe point" in capsys.readouterr().err


def test_number_or_nan_takes_no_bool_for_a_number():
    """A flag given for a number (``true`` is 1.0 to float()): range checks read it as NaN and refuse it."""
    import math

    from lattice_lab.common.errors import number_or_nan

    assert all(math.isnan(number_or_nan(v)) for v in (True, False, None, "abc", [1]))
    assert number_or_nan("0.5") == 0.5 and number_or_nan(2) == 2.0
