"""`unweight export` to compressed-tensors pack-quantized: the packing is the library's bit for bit;
the compressed-tensors library decompresses every exported Linear to exactly the weights unweight
loads; sparsity structures are recorded; a symmetric export loads through transformers with the
same logits; what has no compressed-tensors form is refused by name and nothing is written."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from unweight.cli import main
from unweight.errors import UnweightError
from unweight.export import _check_pattern, pack_int32
from unweight.formats import decode_tensors

compressed_tensors = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]


def _run(argv, json_out=True):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main([*argv, "--json"] if json_out else argv)
    assert rc == 0
    return json.loads(stdout.getvalue()) if json_out else stdout.getvalue()


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_compressed_tensors_own(bits):
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for rows, cols in [(3, 32), (5, 7), (2, 100), (1, 1)]:
        q = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
        signed = (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        expected = pack_to_int32(signed, bits)
        assert torch.equal(pack_int32(q, bits), expected), (rows, cols)
        # the zero points are packed along the output dimension
        assert torch.equal(pack_int32(q.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


CASES = {
    "gptq4-asym": (["--method", "gptq", "--bits", "4", "--group-size", "16", *CALIB], None),
    "gptq4-sym": (["--method", "gptq", "--bits", "4", "--group-size", "16", "--scheme", "sym", *CALIB], None),
    "sparsegpt24-gptq3": (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "gptq", "--bits", "3",
                           "--group-size", "16", *CALIB], "2:4"),
    "rtn8-channel-sym": (["--method", "rtn", "--bits", "8", "--group-size", "0", "--scheme", "sym"], None),
    "wanda50": (["--method", "wanda", "--sparsity", "0.5", *CALIB], "unstructured"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_decompresses_the_export_to_unweights_weights(tiny_llama, tmp_path, case):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    argv, structure = CASES[case]
    src, out = tmp_path / "compressed", tmp_path / "ct"
    main(["compress", str(tiny_llama), str(src), *argv])
    stats = _run(["export", str(src), str(out)])
    ours = decode_tensors(src)
    stored = load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"

    exported = set()
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for module in group["targets"]:
            local = {k[len(module) + 1:]: v for k, v in stored.items() if k.startswith(module + ".")}
            assert local["weight_packed"].dtype == torch.int32 and "weight" not in local
            dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(dense.to(ours[f"{module}.weight"].dtype), ours[f"{module}.weight"]), module
            exported.add(module)
    assert len(exported) == stats["quantized"] == (0 if case == "wanda50" else 14)
    for name, t in ours.items():  # everything else is stored dense, as unweight loads it
        if name.removesuffix(".weight") not in exported:
            assert torch.equal(stored[name], t), name

    if structure is None:
        assert "sparsity_config" not in qc
    else:
        sc = qc["sparsity_config"]
        assert sc["sparsity_structure"] == structure and len(sc["targets"]) == 14
        assert sc["global_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_a_symmetric_export_loads_through_transformers_with_the_same_logits(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import unweight  # noqa: F401  (registers unweight's formats)

    src, out = tmp_path / "compressed", tmp_path / "ct"
    main(["compress", str(tiny_llama), str(src), *CASES["gptq4-sym"][0]])
    _run(["export", str(src), str(out)])
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    ours = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("argv, message", [
    (["--method", "kmeans", "--k", "16"], "K-means codebooks"),
    (["--method", "rtn", "--bits", "4", "--group-size", "16", "--scheme", "asym_float"], "asym_float"),
    (["--method", "rtn", "--bits", "4", "--group-size", "24"], "group size 24 does not divide the"),
    (["--method", "rtn", "--bits", "4", "--group-size", "16", "--outliers", "4"], "outliers"),
    (["--method", "awq", "--bits", "4", "--group-size", "16", *CALIB], "AWQ input scales"),
    (["--method", "lossless"], "export takes a folder written by"),
])
def test_what_has_no_compressed_tensors_form_is_refused_and_nothing_written(tiny_llama, tmp_path, argv,
                                                                               message, capsys):
    src, out = tmp_path / "compressed", tmp_path / "ct"
    assert main(["compress", str(tiny_llama), str(src), *argv]) == 0
    capsys.readouterr()
    assert main(["export", str(src), str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert err.startswith("unweight export: error:") and message in err and str(src) in err
    assert not out.exists() and not list(tmp_path.glob("ct*"))


def test_a_broken_nm_pattern_is_refused():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    _check_pattern(w, "2:4")
    with pytest.raises(UnweightError, match="2:4"):
        _check_pattern(torch.tensor([[1.0, 1.0, 2.0, 0.0]]), "2:4")
