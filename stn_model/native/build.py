"""Builds the native sampler library: `python -P -m stn_model.native.build` (or run this file).

`-P` keeps the current directory off the import path, so the build lands next to the installed
package, not next to a checkout the command happens to run in. `--force` builds even when a
library of the right name exists (one that does not load: copied from another machine, cut).

The library lands next to its source, named after a hash of the source, the compiler flags and
the TensorFlow version, so a change to any of them builds a new one (older ones are removed);
when it is up to date nothing is built. This file imports only the standard library until it
compiles, so the up-to-date check is fast when run as a file.
"""

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("bilinear_sampler.cc")
PREFIX = "_bilinear_sampler_"
FLAGS = ["-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-DNDEBUG"]
BUILD_COMMAND = "python -P -m stn_model.native.build --force"


@functools.cache
def library_path():
    """Where the library for the current source, flags and TensorFlow version belongs."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    # Absent when TensorFlow comes from another distribution (tensorflow-cpu, ...).
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        digest.update(importlib.metadata.version("tensorflow").encode())
    return SOURCE.with_name(f"{PREFIX}{digest.hexdigest()[:16]}.so")


def build(force=False):
    """Compiles the library unless it is up to date (or `force`); -> its path."""
    target = library_path()
    if target.exists() and not force:
        return target
    print(f"native sampler: building {target.name} (about 20 s)", file=sys.stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        command = [
            "g++",
            *FLAGS,
            str(SOURCE),
            "-o",
            str(partial),
            *tf.sysconfig.get_compile_flags(),
            *tf.sysconfig.get_link_flags(),
        ]
        subprocess.run(command, check=True)
        partial.replace(target)
    for stale in target.parent.glob(f"{PREFIX}*.so"):
        if stale != target:
            stale.unlink()
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the native sampler library.")
    parser.add_argument("--force", action="store_true", help="build even if it looks up to date")
    force = parser.parse_args(argv).force
    up_to_date = library_path().exists() and not force
    try:
        path = build(force)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"native sampler: build failed ({error})", file=sys.stderr)
        return 1
    if not up_to_date:
        print(f"native sampler: built {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
