"""The committed gRPC stubs are exactly what grpcio-tools makes of tandem.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "tandem.proto", tmp_path / "protos" / "tandem.proto")
    status = protoc.main([
        "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}", str(tmp_path / "protos" / "tandem.proto"),
    ])
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos` and commit"
