"""pytest plugin for the sanitizer run (``-p asan_first``): import kdns from the sanitizer
build before conftest puts the worktree first on sys.path; once imported, every kdns
module comes from that build."""
import os
import sys

SRC = os.environ["KDNS_SANITIZER_SRC"]
sys.path.insert(0, SRC)
import kdns.packet._fastpath  # noqa: E402
import kdns.zone._compile  # noqa: E402

for m in (kdns.packet._fastpath, kdns.zone._compile):
    if not m.__file__.startswith(SRC):
        raise RuntimeError(f"{m.__name__} from {m.__file__}, not the sanitizer build")
sys.path.remove(SRC)
