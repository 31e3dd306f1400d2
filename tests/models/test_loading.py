import pytest

from flatquant.models import loading


def _builtin_gguf_or_skip():
    pytest.importorskip("gguf")
    try:
        return loading.builtin_gguf("smollm2-135m")
    except Exception:  # not installed and no network: nothing to read
        pytest.skip("the built-in GGUF is not available")


def test_gguf_parsed_once_reuses_one_reader_and_restores_gguf():
    import gguf

    path = _builtin_gguf_or_skip()
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with loading._gguf_parsed_once(str(path)):
        r1, r2 = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert r1 is r2 and isinstance(r1, reader_cls)
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map  # restored after the load
    with loading._gguf_parsed_once("not-a-gguf-folder"):  # other sources: nothing is patched
        assert gguf.GGUFReader is reader_cls


def test_gguf_metadata_same_through_the_shared_reader():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(_builtin_gguf_or_skip())
    plain = load_gguf_checkpoint(path)
    with loading._gguf_parsed_once(path):
        first, second = load_gguf_checkpoint(path), load_gguf_checkpoint(path)
    assert first == plain and second == plain  # config, tokenizer vocabulary and merges unchanged
