"""The serving side never imports torch: every module of seqserve.server and seqserve.clients, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib, json, pkgutil, sys
import seqserve.server, seqserve.clients, seqserve.protos.v1
names = ["seqserve.protos.v1.seqserve_pb2", "seqserve.protos.v1.seqserve_pb2_grpc",
         "seqserve.protos.inference.open_inference_pb2", "seqserve.protos.inference.open_inference_pb2_grpc"]
for package in (seqserve.server, seqserve.clients):
    names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def test_server_and_clients_import_no_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "seqserve.server.app" in report["modules"] and "seqserve.server.cli" in report["modules"]
    assert any(m.startswith("seqserve.clients.") for m in report["modules"])
    assert report["torch"] == []


def test_serve_command_imports_no_torch():
    probe = (
        "import sys; from seqserve.cli import build_command_parser; build_command_parser('serve'); "
        "print([m for m in sys.modules if m == 'torch'])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
