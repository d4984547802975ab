"""The --from-file source's reload rules: a truncated file keeps the last good image, and
edits that keep the mtime (cp -p, rsync -t) are still seen."""
from __future__ import annotations

import os

import yaml

from kdns.serve.supervisor import ServeConfig, WatchedFile, zone_file_loader

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"},
       "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}


def source(path) -> WatchedFile:
    return WatchedFile(str(path), zone_file_loader(ServeConfig(from_file=str(path))))


def test_emptied_file_keeps_the_last_good_image(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(SVC))
    src = source(f)
    assert src.first()
    f.write_text("")                   # what `kubectl get ... > c.yaml` does first
    assert src.poll() is None
    assert src.poll(force=True) is None            # SIGHUP does not publish it either
    f.write_text(yaml.safe_dump({**SVC, "metadata": {"name": "b", "namespace": "x"}}))
    assert src.poll() is not None                  # the rewritten file is published


def test_empty_after_empty_is_published(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("")
    src = source(f)
    assert src.first()                 # an empty start is deliberate: served
    f.write_text("---\n")
    assert src.poll() is not None      # empty again: nothing good to keep


def test_edit_that_keeps_size_and_mtime_reloads(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(SVC))
    src = source(f)
    first = src.first()
    st = os.stat(f)
    # Same size, same mtime, different content: only ctime moves (cp -p, rsync -t).
    f.write_text(yaml.safe_dump(SVC).replace("10.0.0.1", "10.0.0.2"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size
    data = src.poll()
    assert data is not None and data != first
