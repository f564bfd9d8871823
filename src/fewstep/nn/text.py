"""Text encoders for text-to-image denoisers (networks only: they know nothing of noise schedules).

Every encoder maps a list of prompts to

* ``context``: ``[B, L, dim]`` float, one vector per token (zeros at padding), for cross-attention;
* ``context_mask``: ``[B, L]`` bool, True at real tokens; every row has at least one (a BOS token);
* ``pooled``: ``[B, dim]``, one vector per prompt (e.g. to add to the timestep embedding);

and has the attribute ``dim``. ``L`` is fixed by ``max_length``, so encodings of different batches
(e.g. the conditional and the null prompts of classifier-free guidance) can be concatenated. The
empty prompt ``""`` is the null condition.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
PAD, UNK, BOS = 0, 1, 2


def split_words(text: str) -> list[str]:
    """Lower-case words, split on anything that is not a letter or a digit (numerals are words)."""
    return re.findall(r"[^\W_]+", text.lower())


class WordTokenizer:
    """Word-level tokenizer: ``<bos>`` then one id per word, padded with ``<pad>`` to ``max_length``.

    Ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, then ``vocab[i]`` = i + 3. ``vocab`` is a plain
    list of words (no special tokens) so it can be stored in checkpoint hyper-parameters. Words
    outside it become ``<unk>``, with one warning per call listing them; longer prompts are cut.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 16) -> None:
        vocab = list(vocab)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<bos> and a word), got {max_length}")
        bad = [w for w in vocab if not isinstance(w, str) or split_words(w) != [w]]
        if bad:
            raise ValueError(f"vocabulary entries must be single lower-case words, got {bad[:5]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate words; build it with WordTokenizer.build(captions)")
        self.vocab, self.max_length = vocab, max_length
        self.ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(vocab)}

    @staticmethod
    def build(captions: Iterable[str]) -> list[str]:
        """The sorted list of distinct words of ``captions``: a deterministic vocabulary."""
        return sorted({w for text in captions for w in split_words(text)})

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.vocab)

    def __call__(self, prompts: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(ids [B, max_length] long, mask [B, max_length] bool)`` of a list of prompts."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not one string")
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.long)
        unknown: set[str] = set()
        truncated = 0
        for row, text in enumerate(prompts):
            tokens = split_words(text)
            unknown.update(w for w in tokens if w not in self.ids)
            if len(tokens) > self.max_length - 1:
                truncated += 1
                tokens = tokens[: self.max_length - 1]
            ids[row, : len(tokens) + 1] = torch.tensor([BOS] + [self.ids.get(w, UNK) for w in tokens])
        if unknown:
            warnings.warn(
                f"words not in the {len(self.vocab)}-word vocabulary, encoded as <unk>: {', '.join(sorted(unknown))}",
                stacklevel=2,
            )
        if truncated:
            warnings.warn(f"{truncated} prompt(s) cut to {self.max_length - 1} words (max_length)", stacklevel=2)
        return ids.to(device), (ids != PAD).to(device)

    def decode(self, ids: Tensor) -> list[str]:
        """The words of ``[B, L]`` ids (special tokens dropped): for inspection."""
        words = [*SPECIAL_TOKENS, *self.vocab]
        return [" ".join(words[i] for i in row.tolist() if i >= len(SPECIAL_TOKENS)) for row in ids]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the sequence of ``x [B, L, D]`` at the True entries of ``mask [B, L]``."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


class ScratchTextEncoder(nn.Module):
    """A small Transformer over words, trained jointly with the denoiser.

    Token + learned position embeddings, ``depth`` pre-norm Transformer encoder layers
    (Vaswani et al. 2017; pre-norm as in Xiong et al. 2020) attending to real tokens only
    (a padding mask), a final LayerNorm; ``pooled`` is the mean over real tokens.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_length: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"text_encoder.dim={dim} must be divisible by text_encoder.heads={heads}")
        self.tokenizer = WordTokenizer(vocab, max_length)
        self.dim, self.max_length = dim, max_length
        self.token = nn.Embedding(len(self.tokenizer), dim, padding_idx=PAD)
        self.position = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No nested tensors: they only pay off for long, ragged batches and change numerics.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        with torch.no_grad():
            self.token.weight[PAD].zero_()

    def encode_tokens(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Encode ``[B, L]`` ids with their ``[B, L]`` bool mask (True at real tokens)."""
        x = self.token(ids) + self.position[:, : ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        x = x * mask.unsqueeze(-1).to(x.dtype)  # padding carries nothing, whatever attention left there
        return {"context": x, "context_mask": mask, "pooled": masked_mean(x, mask)}

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        ids, mask = self.tokenizer(prompts, device=self.token.weight.device)
        return self.encode_tokens(ids, mask)


CLIP_HELP = (
    "text_encoder=clip needs text_encoder.path=DIR of a CLIPTextModel and its tokenizer saved with save_pretrained "
    "(on a machine with internet: CLIPTextModel.from_pretrained(NAME).save_pretrained(DIR) and "
    "CLIPTokenizer.from_pretrained(NAME).save_pretrained(DIR))"
)


class CLIPTextEncoder(nn.Module):
    """A frozen pretrained CLIP text encoder (Radford et al. 2021), as in Stable Diffusion / unCLIP.

    Loaded from a local directory only (``local_files_only=True``; nothing is downloaded).
    ``context`` is the last hidden state, ``pooled`` the pooler output (the EOS token's state),
    ``context_mask`` the tokenizer's attention mask. The weights never train (requires_grad False,
    eval mode even after ``.train()``) and are left out of ``state_dict()``: a checkpoint stores the
    path, and loading one takes the weights from that directory again.
    """

    def __init__(self, path: str | os.PathLike | None, max_length: int = 77) -> None:
        super().__init__()
        _check_clip_dir(path)
        from transformers import CLIPTextModel, CLIPTokenizer  # lazy: fewstep imports without transformers

        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            model = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise ValueError(f"{CLIP_HELP}; cannot load {path}: {reason}") from None
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.path = str(path)
        self.max_length = min(max_length, model.config.max_position_embeddings)
        self.dim = model.config.hidden_size
        self.register_state_dict_post_hook(_drop_clip_weights)
        self.register_load_state_dict_pre_hook(_fill_clip_weights)

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout and the like stay off
        return self

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not one string")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        mask = mask.bool()
        context = out.last_hidden_state * mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return {"context": context, "context_mask": mask, "pooled": out.pooler_output}


def _check_clip_dir(path: str | os.PathLike | None) -> None:
    """Check that ``path`` is a directory with a CLIP config before transformers sees it (never a Hub name)."""
    if path is None or not str(path).strip():
        raise ValueError(f"{CLIP_HELP}; text_encoder.path is not set")
    config = os.path.join(str(path), "config.json")
    if not os.path.isdir(str(path)):
        raise ValueError(f"{CLIP_HELP}; {path} is not a directory")
    try:
        with open(config, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{CLIP_HELP}; cannot read {config} ({type(err).__name__})") from None
    if model_type not in ("clip", "clip_text_model"):
        raise ValueError(f"{CLIP_HELP}; {config} is a {model_type!r} model, not CLIP")
    # transformers would make an empty tokenizer from a directory without one, rather than fail.
    files = set(os.listdir(str(path)))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise ValueError(f"{CLIP_HELP}; {path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")


def _drop_clip_weights(module: CLIPTextEncoder, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # The frozen weights live in module.path: checkpoints need not carry hundreds of MB of them.
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _fill_clip_weights(module: CLIPTextEncoder, state_dict: dict, prefix: str, *args) -> None:
    # A checkpoint without the frozen weights loads strictly: the ones in memory stand in for them.
    for key, value in module.model.state_dict().items():
        state_dict.setdefault(prefix + "model." + key, value)
