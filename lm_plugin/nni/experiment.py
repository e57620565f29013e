"""Run an NNI experiment of LayerMerge trials from Python: local training service, web server on loopback only.

``nni.experiment.Experiment('local')`` does the work; this module adds what a LayerMerge search needs around it:

- :func:`trial_command` — the ``trialCommand`` of :mod:`lm_plugin.nni.trial` with this interpreter;
- :func:`loopback_preload` — NNI 3.0's web server listens on every interface and has no setting for it (the
  project is archived, so no fix will come): a two-line Node.js preload, passed through ``NODE_OPTIONS``, makes it
  listen on 127.0.0.1 only. :func:`run_experiment` uses it; for ``nnictl`` see docs/nni-experiments.md;
- :func:`run_experiment` — start on a free loopback port, wait until the experiment is finished (trial count or
  duration limit reached, or the tuner has nothing left to propose and every trial has ended), stop it, and return
  where its data lies for :func:`lm_plugin.nni.report.experiment_report`.

Example:
    >>> config = load_config("examples/nni_experiment/config.yml")
    >>> run = run_experiment(config)
    >>> experiment_report(run.directory, max_drop=1.0)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nni.experiment import Experiment, ExperimentConfig

from ..errors import LayerMergeError

__all__ = ["FINAL_TRIAL_STATUSES", "ExperimentError", "ExperimentRun", "free_port", "listening_addresses",
           "load_config", "loopback_preload", "run_experiment", "trial_command"]

#: NNI trial statuses after which a trial never runs again.
FINAL_TRIAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"})

# Node's server.listen(port) binds every interface; with a host argument it binds that one. The patch fills in
# 127.0.0.1 where NNI's REST server gives none (pipes, `listen(path)`, are left alone).
_LOOPBACK_JS = """\
// lm_plugin: make NNI's web server (node) listen on 127.0.0.1 only. Load with NODE_OPTIONS="--require <this file>".
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  else if (args[0] && typeof args[0] === 'object' && args[0].path === undefined && !args[0].host)
    args[0] = Object.assign({}, args[0], { host: '127.0.0.1' });
  return listen.apply(this, args);
};
"""


class ExperimentError(LayerMergeError, RuntimeError):
    """The NNI experiment could not start, failed, or did not finish in time (the message says which)."""


def trial_command(args: Sequence[str], python: str | None = None) -> str:
    """``trialCommand`` that runs :mod:`lm_plugin.nni.trial` with ``args`` (default interpreter: this one)."""
    return shlex.join([python or sys.executable, "-m", "lm_plugin.nni.trial", *args])


def load_config(path: str | os.PathLike[str], python: str | None = None) -> ExperimentConfig:
    """An experiment config file as ``nnictl create`` reads it, with a trial command that starts with ``python``
    (or ``python3``) run by ``python`` instead (default: this interpreter).

    ``nnictl`` runs ``python`` from the shell's PATH (an activated virtual environment); from Python, the
    interpreter that runs the experiment is the one that has lm_plugin installed.
    """
    config = ExperimentConfig.load(path)
    words = shlex.split(config.trial_command or "")
    if words and words[0] in ("python", "python3"):
        words[0] = python or sys.executable
        config.trial_command = shlex.join(words)
    return config


def loopback_preload(directory: str | os.PathLike[str] | None = None) -> Path:
    """Write the Node.js preload that keeps NNI's web server on 127.0.0.1 and return its path.

    Args:
        directory: where to write ``lm_plugin_loopback.js`` (default ``~/nni-experiments``, NNI's own folder).

    Use: ``NODE_OPTIONS="--require <path>" nnictl create --config config.yml``.
    """
    folder = Path(directory).expanduser() if directory is not None else Path.home() / "nni-experiments"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lm_plugin_loopback.js"
    if not path.is_file() or path.read_text() != _LOOPBACK_JS:
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(_LOOPBACK_JS)
        staging.replace(path)
    return path


def listening_addresses(port: int) -> list[str] | None:
    """Local addresses with a TCP socket listening on ``port`` (Linux ``/proc/net/tcp*``; None elsewhere)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.is_file() for t in tables):
        return None
    found = []
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                    continue
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                found.append(socket.inet_ntop(family, raw))
    return sorted(set(found))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _node_options(preload: Path) -> Iterator[None]:
    """NNI starts node with this process's environment: add the preload for the duration of the start."""
    before = os.environ.get("NODE_OPTIONS")
    os.environ["NODE_OPTIONS"] = " ".join(filter(None, [before, f"--require {shlex.quote(str(preload))}"]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NODE_OPTIONS", None)
        else:
            os.environ["NODE_OPTIONS"] = before


@dataclass(frozen=True)
class ExperimentRun:
    """A finished experiment.

    Attributes:
        id: NNI's experiment id.
        directory: the experiment's folder (``<experimentWorkingDirectory>/<id>``: ``db/nni.sqlite``, trials).
        status: NNI's last status (``DONE``; ``TUNER_NO_MORE_TRIAL`` when the tuner ran out of proposals).
        port: the loopback port its web server used.
        trials: trial id → NNI's final trial status.
        listening: addresses the web server listened on (checked after the start; None where the OS does not
            tell).
    """

    id: str
    directory: Path
    status: str
    port: int
    trials: dict[str, str]
    listening: list[str] | None = None


def _trial_statuses(experiment: Experiment) -> dict[str, str]:
    return {job.trialJobId: job.status for job in experiment.list_trial_jobs()}


def run_experiment(config: ExperimentConfig, *, port: int | None = None, poll_s: float = 2.0,
                   timeout_s: float | None = None, experiment_id: str | None = None) -> ExperimentRun:
    """Run ``config`` on NNI's local training service, wait for the end, stop the experiment.

    The experiment ends by itself: ``maxTrialNumber`` or ``maxExperimentDuration`` reached and every submitted
    trial finished (NNI status ``DONE``), or the tuner has no proposal left (a GridSearch smaller than
    ``maxTrialNumber``: ``TUNER_NO_MORE_TRIAL``) and no trial is waiting or running. A failed trial (non-zero exit)
    is recorded as FAILED and the experiment goes on.

    Args:
        config: the experiment (``ExperimentConfig.load(path)`` or built in Python); ``trainingService`` local.
        port: web server port (default: a free one); it listens on 127.0.0.1 only.
        poll_s: seconds between status checks.
        timeout_s: stop the experiment and raise if it has not finished after this long (default: no limit
            beyond the config's own ``maxExperimentDuration``).
        experiment_id: NNI experiment id (default: a fresh random one).

    Raises:
        ExperimentError: the web server did not start, NNI reported ERROR, or ``timeout_s`` passed.
    """
    if config.trial_concurrency is None or config.trial_command is None:
        raise ExperimentError("the experiment config needs trialCommand and trialConcurrency")
    experiment = Experiment(config, id=experiment_id)
    directory = Path(config.canonical_copy().experiment_working_directory) / experiment.id
    port = port or free_port()
    preload = loopback_preload(Path(config.canonical_copy().experiment_working_directory))
    try:
        with _node_options(preload):
            experiment.start(port)
    except Exception as exc:
        raise ExperimentError(f"NNI's web server did not start on 127.0.0.1:{port} ({type(exc).__name__}: {exc}); "
                              f"see {directory / 'log'}") from exc
    start = time.monotonic()
    try:
        listening = listening_addresses(port)
        exposed = [a for a in listening or [] if a not in ("127.0.0.1", "::1")]
        if exposed:
            raise ExperimentError(f"NNI's web server listens on {exposed} besides loopback: the Node.js preload "
                                  f"{preload} did not take effect (was NODE_OPTIONS overridden?); stopped it")
        status, quiet_polls = "", 0
        while True:
            try:
                status = experiment.get_status()
            except OSError as exc:  # requests' ConnectionError: the manager is gone (nnictl stop, killed)
                raise ExperimentError(f"NNI's manager of experiment {experiment.id} stopped answering on port {port} "
                                      f"({type(exc).__name__}); was it stopped from outside (nnictl stop)? See "
                                      f"{directory / 'log' / 'nnimanager.log'}") from exc
            if status == "ERROR":
                logs = directory / "log"
                raise ExperimentError(f"NNI reported ERROR for experiment {experiment.id}; see "
                                      f"{logs / 'nnimanager.log'} and {logs / 'dispatcher.log'}")
            if status in ("DONE", "STOPPED"):
                break
            if status == "TUNER_NO_MORE_TRIAL":
                # A trial the tuner proposed last may still be queued in NNI: wait for a few quiet polls.
                statuses = _trial_statuses(experiment)
                quiet_polls = quiet_polls + 1 if all(s in FINAL_TRIAL_STATUSES for s in statuses.values()) else 0
                if quiet_polls >= 3:
                    break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ExperimentError(f"experiment {experiment.id} did not finish within {timeout_s:g} s (status "
                                      f"{status}); it was stopped. Raise the timeout or lower maxTrialNumber")
            time.sleep(poll_s)
        trials = _trial_statuses(experiment)
    finally:
        experiment.stop()
    return ExperimentRun(experiment.id, directory, status, port, trials, listening)
