"""The committed gRPC stubs agree with proto/ on what matters: messages, fields, enums and services.

The comparison is semantic (descriptors, not bytes), so a patch release of grpcio-tools that only
changes a version string in the generated code does not fail it, while an edit of the .proto without
`make proto` does: the last tests here edit a copy of the .proto and check that the comparison catches it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from google.protobuf import descriptor_pb2

from cluster.rpc.outrider.v1 import outrider_pb2, outrider_pb2_grpc

ROOT = Path(__file__).parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "outrider/v1/outrider.proto"
STUBS = ROOT / "cluster/rpc/outrider/v1"


def compile_descriptor(proto_root: Path, tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    """What protoc makes of the .proto today, under the import path the stubs are generated with."""
    out = tmp / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-Icluster/rpc={proto_root}",
                    f"--descriptor_set_out={out}", str(proto_root / PROTO)], cwd=ROOT, check=True)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fd,) = fds.file
    for msg in _messages(fd.message_type):  # descriptor sets carry the derived json_name; generated code doesn't
        for field in msg.field:
            field.ClearField("json_name")
    return fd


def _messages(messages):
    for m in messages:
        yield m
        yield from _messages(m.nested_type)


def committed_descriptor() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(outrider_pb2.DESCRIPTOR.serialized_pb)


def rpc_paths(fd: descriptor_pb2.FileDescriptorProto) -> set[str]:
    return {f"/{fd.package}.{s.name}/{m.name}" for s in fd.service for m in s.method}


def stub_drift(proto_root: Path, tmp: Path) -> list[str]:
    """Every way the committed stubs disagree with the .proto under proto_root; empty when fresh."""
    fresh, committed = compile_descriptor(proto_root, tmp), committed_descriptor()
    drift = []
    if fresh != committed:
        old = {m.name: m for m in committed.message_type}
        for m in fresh.message_type:
            if m != old.get(m.name):
                drift.append(f"message {m.name}")
        drift += [f"message {n} (removed)" for n in old.keys() - {m.name for m in fresh.message_type}]
        if [e for e in fresh.enum_type] != [e for e in committed.enum_type]:
            drift.append("enums")
        if list(fresh.service) != list(committed.service):
            drift.append("services in outrider_pb2.py")
        drift = drift or ["file options or imports"]
    grpc_src = (STUBS / "outrider_pb2_grpc.py").read_text()
    in_grpc = set(re.findall(r"'(/[\w.]+/\w+)'", grpc_src))
    if in_grpc != rpc_paths(fresh):
        drift.append(f"rpc methods in outrider_pb2_grpc.py: {sorted(in_grpc ^ rpc_paths(fresh))}")
    pyi = (STUBS / "outrider_pb2.pyi").read_text()
    for m in fresh.message_type:
        missing = [f.name for f in m.field if not re.search(rf"\b{f.name}\b", pyi)]
        if not re.search(rf"^class {m.name}\(", pyi, re.M) or missing:
            drift.append(f"outrider_pb2.pyi: {m.name} {missing}")
    return drift


def test_stubs_agree_with_proto(tmp_path):
    assert stub_drift(PROTO_ROOT, tmp_path) == [], "stale stubs: run `make proto`"


def test_generated_grpc_version_is_within_the_declared_range():
    """The stub refuses to import under a grpcio older than the grpcio-tools that wrote it."""
    generated = tuple(int(x) for x in outrider_pb2_grpc.GRPC_GENERATED_VERSION.split("."))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"grpcio\s*>=", d)]
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))
    assert floor >= generated, f"pyproject.toml allows {spec}, the stubs need grpcio>={generated}"


def _edited_copy(tmp: Path, edit) -> Path:
    root = tmp / "proto"
    shutil.copytree(PROTO_ROOT, root)
    path = root / PROTO
    text = path.read_text()
    path.write_text(edit(text))
    assert path.read_text() != text
    return root


def test_an_added_field_without_make_proto_is_caught(tmp_path):
    root = _edited_copy(tmp_path, lambda t: t.replace("message AbortRequest {",
                                                      "message AbortRequest {\n  bool hard = 99;", 1))
    assert stub_drift(root, tmp_path) == ["message AbortRequest", "outrider_pb2.pyi: AbortRequest ['hard']"]


def test_a_renamed_field_without_make_proto_is_caught(tmp_path):
    fd = committed_descriptor()
    msg = next(m for m in fd.message_type if m.field)
    field = msg.field[0].name
    root = _edited_copy(tmp_path, lambda t: re.sub(rf"\b{field}\b(\s*=)", rf"{field}_renamed\1", t, count=1))
    assert any(d.startswith("message ") for d in stub_drift(root, tmp_path))


def test_an_added_rpc_without_make_proto_is_caught(tmp_path):
    root = _edited_copy(tmp_path, lambda t: t.replace(
        "service Outrider {", "service Outrider {\n  rpc Ping(AbortRequest) returns (AbortResponse);", 1))
    drift = stub_drift(root, tmp_path)
    assert "services in outrider_pb2.py" in drift
    assert any("/outrider.v1.Outrider/Ping" in d for d in drift)
