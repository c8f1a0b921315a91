"""The committed gRPC stubs are what grpcio-tools makes of the committed .proto files."""

from pathlib import Path

from loraledger.proto.codegen import generate_stubs

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_current() -> None:
    generated = generate_stubs(ROOT)
    assert generated, "no stubs generated"
    for path, text in generated.items():
        assert path.exists(), f"{path} missing: run `make protos`"
        assert path.read_text() == text, f"{path} is stale: run `make protos`"


def test_services_expose_the_documented_methods() -> None:
    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb

    inference = pb.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in inference.methods} == {
        "Generate", "GenerateStream", "LoadAdapter", "UnloadAdapter", "ListAdapters",
    }
    assert inference.methods_by_name["GenerateStream"].server_streaming
    attribution = pb.DESCRIPTOR.services_by_name["Attribution"]
    assert {m.name for m in attribution.methods} == {"GetRecord", "GetRewardProof", "ListEpochs", "GetEpochExport"}
