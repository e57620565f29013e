"""Keep the benchmarks' expensive inputs with the repository: the trained workload models and the tables built on them.

The published numbers come from one training of ``resnet_fm`` / ``mbv2_fm`` (a retraining on another machine gives
other weights, and every importance table is signed by the weights), and some tables cost hours of CPU (the
``finetune`` reference, ``mbv2_fm``'s ``distill`` table). ``export`` copies the checkpoints and the SQLite tables
of ``benchmarks/cache`` into ``benchmarks/artifacts/`` (each table as one clean file, without the claims of the
processes that wrote it); ``restore`` puts them back where the benchmarks look, so that a fresh machine resumes
instead of recomputing. A partly built table resumes where it stopped.

    python benchmarks/artifacts.py export     # after a benchmark session
    python benchmarks/artifacts.py restore    # on a fresh machine, before the benchmarks
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from lm_plugin.store.paths import checkpoint_dir

HERE = Path(__file__).parent
ARTIFACTS = HERE / "artifacts"
CACHE = HERE / "cache"
MODELS = ("resnet_fm_e3_s0.pt", "mbv2_fm_e3_s0.pt")


def export() -> None:
    (ARTIFACTS / "checkpoints").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "tables").mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        if (checkpoint_dir() / name).is_file():
            shutil.copy2(checkpoint_dir() / name, ARTIFACTS / "checkpoints" / name)
            print(f"checkpoint {name}")
    for table in sorted(CACHE.glob("*.sqlite")):
        target = ARTIFACTS / "tables" / table.name
        target.unlink(missing_ok=True)
        with closing(sqlite3.connect(table)) as db:
            db.execute("VACUUM INTO ?", (str(target),))  # one consistent file, the write-ahead log included
        with closing(sqlite3.connect(target)) as db, db:
            for kind in ("claims", "locks"):
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (kind,)).fetchone():
                    db.execute(f"DELETE FROM {kind}")
        print(f"table {table.name}: {target.stat().st_size // 1024} KiB")


def restore() -> None:
    checkpoint_dir().mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(exist_ok=True)
    for path in sorted((ARTIFACTS / "checkpoints").glob("*.pt")):
        if not (checkpoint_dir() / path.name).exists():
            shutil.copy2(path, checkpoint_dir() / path.name)
            print(f"checkpoint {path.name} -> {checkpoint_dir()}")
    for path in sorted((ARTIFACTS / "tables").glob("*.sqlite")):
        if not (CACHE / path.name).exists():  # never overwrite a table that may have grown here
            shutil.copy2(path, CACHE / path.name)
            print(f"table {path.name} -> {CACHE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["export", "restore"])
    {"export": export, "restore": restore}[ap.parse_args().action]()


if __name__ == "__main__":
    main()
