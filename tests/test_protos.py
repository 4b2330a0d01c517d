"""The committed stubs in spiral/v1 are what `make proto` generates from protos/, and stale ones are caught."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from spiral.commands import protogen  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_up_to_date() -> None:
    """`python -m spiral.commands.protogen --check` (what `make proto-check` runs) passes on the tree."""
    result = subprocess.run([sys.executable, "-m", "spiral.commands.protogen", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_generation_is_reproducible(tmp_path: Path) -> None:
    """Two generations give byte-identical files, with package-absolute imports and a header."""
    first = protogen.generate(tmp_path / "a")
    second = protogen.generate(tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    names = {p.name for p in first}
    for proto in ("tensor", "parameters", "learner", "discriminator", "replay", "pbt"):
        assert f"{proto}_pb2.py" in names and f"{proto}_pb2.pyi" in names
    # Files that declare services get gRPC stubs; message-only files do not.
    assert {"learner_pb2_grpc.py", "discriminator_pb2_grpc.py", "replay_pb2_grpc.py", "pbt_pb2_grpc.py"} <= names
    assert "tensor_pb2_grpc.py" not in names and "parameters_pb2_grpc.py" not in names
    learner = (tmp_path / "a" / "learner_pb2.py").read_text()
    assert learner.startswith(protogen._HEADER_PREFIX)
    assert "from spiral.v1 import tensor_pb2" in learner
    assert "ValidateProtobufRuntimeVersion" not in learner


def _tampered_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "v1"
    shutil.copytree(REPO / "spiral" / "v1", copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_check_accepts_an_untouched_copy(tmp_path: Path) -> None:
    stale, _ = protogen.stale_files(_tampered_copy(tmp_path))
    assert stale == []


def test_check_detects_edited_stub(tmp_path: Path) -> None:
    copy = _tampered_copy(tmp_path)
    path = copy / "replay_pb2_grpc.py"
    # An edit that changes meaning: a renamed method in the service's handler table.
    path.write_text(path.read_text().replace("'Sample': grpc.unary_unary_rpc_method_handler",
                                             "'SampleX': grpc.unary_unary_rpc_method_handler"))
    stale, _ = protogen.stale_files(copy)
    assert stale == ["replay_pb2_grpc.py"]


def _pretend_other_generator(path: Path) -> None:
    """Rewrite the header as if another grpcio-tools release had generated the file."""
    text = path.read_text()
    path.write_text(re.sub(r"grpcio-tools [^,]+,", "grpcio-tools 0.0.0-other,", text, count=1))


def test_other_generator_release_is_compared_by_meaning(tmp_path: Path) -> None:
    """A different grpcio-tools release with the same descriptors is not stale; a changed one is."""
    copy = _tampered_copy(tmp_path)
    for name in ("tensor_pb2.py", "replay_pb2_grpc.py"):
        _pretend_other_generator(copy / name)
        path = copy / name
        path.write_text(path.read_text() + "# style difference of another codegen release\n")
    stale, notes = protogen.stale_files(copy)
    assert stale == []
    assert any("tensor_pb2.py" in note for note in notes)

    # Now the descriptor differs too (the field "shape" renamed "shapf" in an older .proto).
    tensor = copy / "tensor_pb2.py"
    tensor.write_text(tensor.read_text().replace("\\x05shape", "\\x05shapf", 1))
    stale, _ = protogen.stale_files(copy)
    assert stale == ["tensor_pb2.py"]


def test_check_detects_missing_and_extra_files(tmp_path: Path) -> None:
    copy = _tampered_copy(tmp_path)
    (copy / "pbt_pb2.pyi").unlink()
    (copy / "old_pb2.py").write_text("# left over from a deleted .proto\n")
    stale, _ = protogen.stale_files(copy)
    assert stale == ["old_pb2.py", "pbt_pb2.pyi"]


def test_check_cli_names_stale_files_and_exits_nonzero(tmp_path: Path) -> None:
    copy = _tampered_copy(tmp_path)
    (copy / "learner_pb2.pyi").write_text("# hand-edited\n")
    result = subprocess.run([sys.executable, "-m", "spiral.commands.protogen", "--check", "--output-dir", str(copy)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "learner_pb2.pyi" in result.stdout
    assert "learner_pb2.py\n" not in result.stdout


def test_regenerating_into_a_directory_repairs_it(tmp_path: Path) -> None:
    copy = _tampered_copy(tmp_path)
    (copy / "learner_pb2.pyi").write_text("# hand-edited\n")
    (copy / "old_pb2.py").write_text("# left over\n")
    assert protogen.main(["--output-dir", str(copy)]) == 0
    assert protogen.stale_files(copy)[0] == []
    assert not (copy / "old_pb2.py").exists()


def test_stubs_import_and_describe_the_services() -> None:
    replay_grpc = importlib.import_module("spiral.v1.replay_pb2_grpc")
    learner = importlib.import_module("spiral.v1.learner_pb2")
    assert hasattr(replay_grpc, "ReplayBufferServicer") and hasattr(replay_grpc, "add_ReplayBufferServicer_to_server")
    methods = {m.name for m in learner.DESCRIPTOR.services_by_name["PolicyLearner"].methods}
    assert methods == {"GetParameters", "SubmitUnrolls", "Status", "GetTrainingState"}
    assert learner.DESCRIPTOR.package == "spiral.v1"
