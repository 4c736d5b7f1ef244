"""A pretrained model's own tokenizer (``transformers``), with the DK and pause ids CYB needs.

Design notes: docs/internals.md, section `cyb_lightning/data/hf_tokenizer.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np

from ..model.gguf import pretrained_source
from .tokenizer import MAX_PAUSES, TextTokenizer, Vocab

log = logging.getLogger(__name__)


class HFTokenizer(TextTokenizer):
    """The tokenizer of a pretrained model (Hub id or local folder) plus CYB's DK and pause ids.

    Args:
        name_or_path: what ``AutoTokenizer.from_pretrained`` takes. A GGUF file too (``model.gguf``,
            ``pkg://PACKAGE/model.gguf``). Unset (None) under the CLI with an ``HFDecoder``: the decoder's model
            (``name_or_path``, ``gguf_file``, ``revision``), so one setting names both.
        gguf_file: a GGUF file inside the folder or Hub repository ``name_or_path``.
        dk_token: a token of the vocabulary to repurpose as DK (e.g. ``<unused3>``); None adds a new id.
        pause_tokens: tokens to repurpose as ``<pause1>`` … (e.g. ``[<unused0>, <unused1>, <unused2>]``);
            None adds ``num_pauses`` new ids.
        add_ids: add new DK and pause ids even where ``dk_token`` / ``pause_tokens`` name tokens to
            repurpose (command line: ``--data.tokenizer.init_args.add_ids true``).
        num_pauses: how many pause ids to add when they are added. The CLI sets it to ``data.num_pauses``
            (the K of the run), so it is never written in a config.
        add_bos: prepend the BOS id to each document; None = when the tokenizer has a BOS distinct from
            its EOS that is not a chat-turn marker (Gemma, Llama: yes; GPT-2, Qwen2, SmolLM2: no).
        eot_token: the end-of-text separator appended after each document; None = the tokenizer's EOS.
        model_vocab_size: embedding rows of the model; None reads ``vocab_size`` from the model config
            in ``name_or_path`` (falls back to the tokenizer's length).
        revision, trust_remote_code: as for ``from_pretrained``.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        gguf_file: str | None = None,
        dk_token: str | None = None,
        pause_tokens: list[str] | None = None,
        add_ids: bool = False,
        num_pauses: int = 3,
        add_bos: bool | None = None,
        eot_token: str | None = None,
        model_vocab_size: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        if name_or_path is None:
            raise ValueError(
                "data.tokenizer.init_args.name_or_path is not set: name the tokenizer's model, or use an HF decoder "
                "(model.decoder: cyb_lightning.model.HFDecoder), whose model the CLI then reads for the tokenizer too"
            )
        if add_ids and (dk_token is not None or pause_tokens is not None):
            log.info("add_ids: adding new DK and pause ids instead of repurposing %s", [dk_token, pause_tokens])
            dk_token = pause_tokens = None
        if pause_tokens is None and not 0 <= num_pauses <= MAX_PAUSES:
            raise ValueError(f"num_pauses must lie in 0 … {MAX_PAUSES}, got {num_pauses}")
        self.name_or_path = name_or_path
        source, revision = pretrained_source(name_or_path, gguf_file, revision)
        hf = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{name_or_path}: only fast (Rust `tokenizers`) tokenizers are supported")
        token_to_id = hf.get_vocab()
        base_len = len(hf)

        if model_vocab_size is None:
            model_vocab_size = _model_vocab_size(source, revision, trust_remote_code)
        first_new = max(base_len, model_vocab_size or 0)

        # Roles: named tokens are repurposed, the others get new ids in order dk, pause1, pause2, …
        def lookup(token: str, role: str) -> int:
            if token not in token_to_id:
                raise ValueError(
                    f"{role} token {token!r} is not in the vocabulary of {name_or_path}; name an existing "
                    "(unused or reserved) token, or leave it unset "
                    + ("to use the EOS" if role == "eot" else "to add a new id")
                )
            return token_to_id[token]

        next_new = first_new
        if dk_token is not None:
            dk_id = lookup(dk_token, "dk")
        else:
            dk_id, next_new = next_new, next_new + 1
        if pause_tokens is not None:
            pause_ids = tuple(lookup(t, f"pause{i + 1}") for i, t in enumerate(pause_tokens))
        else:
            pause_ids = tuple(range(next_new, next_new + num_pauses))
            next_new += num_pauses
        reserved = (dk_id, *pause_ids)
        if len(set(reserved)) != len(reserved):
            raise ValueError(f"dk and pause ids must be distinct, got dk={dk_id}, pauses={pause_ids}")

        chat = _chat_template_text(hf)
        if eot_token is not None:
            eot_id = lookup(eot_token, "eot")
        else:
            eot_id = hf.eos_token_id
            if eot_id is None:
                raise ValueError(f"{name_or_path} has no EOS token: name the end-of-text separator with eot_token")
            if hf.eos_token in chat:
                log.warning(
                    "%s: the EOS %r is a chat-turn marker; plain-text documents will be separated by it. For "
                    "pretraining-style fine-tuning name the pretraining separator with eot_token (e.g. "
                    "<|endoftext|>)",
                    name_or_path,
                    hf.eos_token,
                )
        pad_id = hf.pad_token_id if hf.pad_token_id is not None else eot_id
        bos_id = hf.bos_token_id
        if add_bos is None:  # a chat-turn marker as BOS would wrap every plain-text document in chat markup
            add_bos = bos_id is not None and bos_id != eot_id and hf.bos_token not in chat
        if add_bos and bos_id is None:
            raise ValueError(f"add_bos=True but {name_or_path} has no BOS token")
        for name, i in (("eos", eot_id), ("pad", pad_id), ("bos", bos_id if add_bos else None)):
            if i is not None and i in reserved:
                raise ValueError(f"the {name} id {i} cannot also be the DK or a pause id")

        # Repurposed tokens (and a named separator) become special, and special tokens are never matched in text.
        repurposed = {i for i in reserved if i < first_new}
        named = {i: role for i, role in _reserved_names(dk_id, pause_ids).items() if i in repurposed}
        if eot_token is not None:
            named[eot_id] = "the end-of-text separator (eot_token)"
        data = json.loads(backend.to_str())
        for entry in data.get("added_tokens", []):
            if entry["id"] in named:
                entry["special"] = True
        self._tok = _backend(json.dumps(data))

        self.vocab = Vocab(
            pad_id=pad_id, eot_id=eot_id, dk_id=dk_id, pause_ids=pause_ids, size=max(next_new, first_new)
        )
        self.bos_id = bos_id if add_bos else None
        self.num_added = next_new - first_new
        self.base_size = first_new
        self._reserved = np.asarray(sorted(reserved), dtype=np.int64)
        self._names = _reserved_names(dk_id, pause_ids)
        self.dropped_reserved = 0

        id_to_token = {i: t for t, i in token_to_id.items()}
        for i, role in sorted(named.items()):
            text = id_to_token.get(i, "")
            if text and i in self._tok.encode(text, add_special_tokens=False).ids:
                raise ValueError(
                    f"text can produce the id {i} ({text!r}) named as {role}: it is an ordinary vocabulary "
                    "entry, not an added/special token; name an unused special token (or, for DK and pauses, "
                    "leave the role unset to add a new id)"
                )

    def __getstate__(self) -> dict:
        # The Rust tokenizer pickles without its encode_special_tokens flag: ship the JSON and set it again.
        state = self.__dict__.copy()
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state: dict) -> None:
        state["_tok"] = _backend(state["_tok"])
        self.__dict__.update(state)

    # -- the CYBTokenizer interface -------------------------------------------------------------------

    @property
    def num_reserved(self) -> int:
        """How many ids CYB reserves (DK + pauses), repurposed or added."""
        return len(self._reserved)

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        out = []
        for e in encs:
            ids = np.asarray(e.ids, dtype=np.int64)
            bad = np.isin(ids, self._reserved)
            if bad.any():  # cannot happen for added or special tokens; a last guard for anything else
                self.dropped_reserved += int(bad.sum())
                ids = ids[~bad]
            if self.bos_id is not None:
                ids = np.concatenate([np.array([self.bos_id], dtype=np.int64), ids])
            out.append(ids)
        return out

    @property
    def role_ids(self) -> frozenset[int]:
        """Padding, end of text (EOS), DK, the pauses, and BOS when ``add_bos`` prepends it."""
        return super().role_ids | ({self.bos_id} if self.bos_id is not None else set())

    def reserved_name(self, i: int) -> str | None:
        return self._names.get(i)

    def decode_text(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.name_or_path!r}, size={self.vocab.size}, added={self.num_added}, "
            f"dk={self.vocab.dk_id}, pauses={list(self.vocab.pause_ids)})"
        )


def _reserved_names(dk_id: int, pause_ids: Sequence[int]) -> dict[int, str]:
    """Display names of the reserved ids: ``<dk>``, ``<pause1>`` …"""
    return {dk_id: "<dk>", **{p: f"<pause{k + 1}>" for k, p in enumerate(pause_ids)}}


def _backend(tokenizer_json: str):
    """The Rust tokenizer with special tokens never matched in text, no padding, no truncation."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    tok.no_padding()
    tok.no_truncation()
    return tok


def _chat_template_text(hf) -> str:
    """All of the tokenizer's chat templates as one string ('' without one): where turn markers appear."""
    template = getattr(hf, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else template


def _model_vocab_size(name_or_path: str, revision: str | None, trust_remote_code: bool) -> int | None:
    """``vocab_size`` of the model config next to the tokenizer (embedding rows), when there is one."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        log.info("no model config for %s (%s); new ids start after the tokenizer's own", name_or_path, err)
        return None
    size = getattr(cfg.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) else None
