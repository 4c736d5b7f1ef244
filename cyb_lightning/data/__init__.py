"""Data: vocabulary, offline quickstart corpus, text sources, sequence layouts and the packed stream."""

from .layout import (
    LAYOUT_CLASSES,
    Layout,
    layout_cyb,
    layout_none,
    layout_pause_groups,
    layout_tbys_random,
    make_layout,
    pause_group_tokens,
    random_pause_slots,
)
from .quickstart import QUICKSTART_DIR, CorpusBuild, build_corpus, build_tokenizer
from .sources import (
    HubC4,
    LocalShards,
    QuickstartBuild,
    QuickstartCorpus,
    TextSource,
    build_quickstart,
    hub_problem,
    source_tokenizer,
)
from .stream import PackedStream
from .tokenizer import MAX_PAUSES, CYBTokenizer, Vocab, reserved_tokens, standard_vocab

__all__ = [
    "LAYOUT_CLASSES",
    "MAX_PAUSES",
    "QUICKSTART_DIR",
    "CYBTokenizer",
    "CorpusBuild",
    "HubC4",
    "Layout",
    "LocalShards",
    "PackedStream",
    "QuickstartBuild",
    "QuickstartCorpus",
    "TextSource",
    "Vocab",
    "build_corpus",
    "build_quickstart",
    "build_tokenizer",
    "layout_cyb",
    "layout_none",
    "layout_pause_groups",
    "layout_tbys_random",
    "make_layout",
    "pause_group_tokens",
    "random_pause_slots",
    "reserved_tokens",
    "hub_problem",
    "source_tokenizer",
    "standard_vocab",
]
