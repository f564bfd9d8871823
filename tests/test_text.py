"""Text encoders: the word tokenizer, the scratch Transformer, and a frozen CLIP loaded from a local directory."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fewstep.nn.text import BOS, PAD, UNK, CLIPTextEncoder, ScratchTextEncoder, WordTokenizer

CAPTIONS = ["a bold seven", "the digit 7, slanted to the right", "a small thin 7", "an upright regular eight", ""]


def test_word_tokenizer():
    vocab = WordTokenizer.build(CAPTIONS)
    assert vocab == sorted(set(vocab)) and "7" in vocab and "digit" in vocab and "" not in vocab
    assert WordTokenizer.build(reversed(CAPTIONS)) == vocab  # deterministic
    tokenizer = WordTokenizer(vocab, max_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known words warn about nothing
        ids, mask = tokenizer(["A Bold seven!", ""])
    assert ids.shape == mask.shape == (2, 6) and mask.dtype == torch.bool
    assert ids[0, :4].tolist() == [BOS, 3 + vocab.index("a"), 3 + vocab.index("bold"), 3 + vocab.index("seven")]
    assert ids[1].tolist() == [BOS] + [PAD] * 5 and mask.sum(1).tolist() == [4, 1]
    assert tokenizer.decode(ids) == ["a bold seven", ""]
    with pytest.warns(UserWarning, match="cut to 5 words"):
        assert tokenizer(["a a a a a a a a"])[1].all()


def test_unknown_words_warn_once_listing_them():
    tokenizer = WordTokenizer(WordTokenizer.build(CAPTIONS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, _ = tokenizer(["a purple seven", "a purple zebra", "a bold seven"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "purple, zebra" in message and "seven" not in message and "bold" not in message
    assert ids[0, 2] == UNK and ids[1, 2:4].tolist() == [UNK, UNK]


def test_word_tokenizer_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="single lower-case words"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["a", "a"])


@pytest.fixture
def scratch():
    torch.manual_seed(0)
    return ScratchTextEncoder(WordTokenizer.build(CAPTIONS), dim=32, depth=2, heads=4, max_length=12).eval()


def test_scratch_encoder_shapes_and_null_prompt(scratch):
    out = scratch(["a bold seven", ""])
    assert scratch.dim == 32
    assert out["context"].shape == (2, 12, 32) and out["context_mask"].shape == (2, 12)
    assert out["pooled"].shape == (2, 32) and out["context_mask"].dtype == torch.bool
    assert out["context_mask"].sum(1).tolist() == [4, 1]
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["context"][~out["context_mask"]] == 0).all()  # padding carries nothing


def test_scratch_encoder_depends_on_the_words(scratch):
    out = scratch(["a bold seven", "a thin seven", "a bold seven"])
    assert not torch.allclose(out["pooled"][0], out["pooled"][1], atol=1e-4)
    torch.testing.assert_close(out["pooled"][0], out["pooled"][2])
    # Word order matters too (position embeddings).
    swapped = scratch(["seven bold a"])
    assert not torch.allclose(out["pooled"][0], swapped["pooled"][0], atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_scratch_encoder_ignores_padding(scratch, train):
    scratch.train(train)  # dropout is 0: train and eval differ only in the attention code path
    ids, mask = scratch.tokenizer(["a bold seven", "the digit 7"])
    garbage = torch.where(mask, ids, torch.randint(3, len(scratch.tokenizer), ids.shape))
    clean, noisy = scratch.encode_tokens(ids, mask), scratch.encode_tokens(garbage, mask)
    for key in ("context", "pooled"):
        torch.testing.assert_close(clean[key], noisy[key], atol=1e-5, rtol=1e-5)


def test_scratch_encoder_trains(scratch):
    scratch.train()
    out = scratch(["a bold seven", "an upright regular eight"])
    (out["context"].square().mean() + out["pooled"].square().mean()).backward()
    assert scratch.token.weight.grad is not None and scratch.position.grad.abs().sum() > 0
    assert scratch.token.weight.grad[PAD].abs().sum() == 0  # the padding embedding stays zero


# ------------------------------------------------------------------------------------------ CLIP
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (Radford et al. 2019)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny CLIP text model and a byte-level BPE tokenizer, built offline.

    The tokenizer is written in the classic files (vocab.json: every byte-level character, alone
    and word-final, plus two merges and the special tokens; merges.txt) that every transformers
    version reads.
    """
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny_clip")
    characters = sorted(set(_bytes_to_unicode().values()))
    tokens = [*characters, *(c + "</w>" for c in characters), "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(directory)
    return directory


def test_clip_encoder_shapes_and_frozen(tiny_clip):
    encoder = CLIPTextEncoder(str(tiny_clip), max_length=20)
    out = encoder(["the bold seven", ""])
    assert encoder.dim == 32
    assert out["context"].shape == (2, 20, 32) and out["pooled"].shape == (2, 32)
    assert out["context_mask"].dtype == torch.bool and out["context_mask"].sum(1).tolist() == [
        12,
        2,
    ]  # bos the b o l d s e v e n eos
    assert all(torch.isfinite(v).all() for v in out.values())
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.model.training  # frozen: always in eval mode
    torch.testing.assert_close(encoder(["the bold seven"])["pooled"][0], out["pooled"][0])


def test_clip_weights_stay_out_of_checkpoints(tiny_clip):
    holder = torch.nn.Module()
    holder.text = CLIPTextEncoder(str(tiny_clip))
    holder.head = torch.nn.Linear(32, 2)
    state = holder.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    holder.load_state_dict(state, strict=True)  # the frozen weights come from the directory


def test_clip_encoder_bad_paths(tmp_path, tiny_clip):
    pytest.importorskip("transformers")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text((tiny_clip / "config.json").read_text())
    (tmp_path / "untokenized").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "untokenized" / name).write_bytes((tiny_clip / name).read_bytes())
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "weightless" / name).write_text((tiny_clip / name).read_text())
    paths = ("missing", ".", "other", "weightless", "untokenized")
    for path in (None, *(tmp_path / p for p in paths)):
        with pytest.raises(ValueError, match=r"^text_encoder=clip needs text_encoder.path=DIR") as err:
            CLIPTextEncoder(None if path is None else str(path))
        assert "\n" not in str(err.value)
