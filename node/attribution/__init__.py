"""Token-level attribution: which contributions shaped an answer, by longest n-gram matches (infini-gram style).

    index.py     suffix-array index per datanet (build, write, memory-mapped open)
    matcher.py   longest matches ending at each answer position, occurrence counts, credit, spans
    mixing.py    mix_weights: lineage and token-level weights -> one record's contributor split
    manifest.py  datanet manifest folder -> contributions -> index beside the manifest
    pool.py      AttributionPool: attribution of finished answers in worker threads
"""

from loraledger.node.attribution.index import (
    INDEX_DIRNAME,
    RECORD_BREAK,
    Contribution,
    DatanetIndex,
    build_index,
    open_index,
    write_index,
)
from loraledger.node.attribution.manifest import LocalTokenizer, contributions_from_manifest, index_manifest
from loraledger.node.attribution.matcher import (
    Attribution,
    ContributionCredit,
    MatchedSpan,
    MatcherConfig,
    attribute,
)
from loraledger.node.attribution.mixing import WEIGHT_SCALE, mix_weights
from loraledger.node.attribution.pool import AttributionPool

__all__ = [
    "INDEX_DIRNAME",
    "RECORD_BREAK",
    "WEIGHT_SCALE",
    "Attribution",
    "AttributionPool",
    "Contribution",
    "ContributionCredit",
    "DatanetIndex",
    "LocalTokenizer",
    "MatchedSpan",
    "MatcherConfig",
    "attribute",
    "build_index",
    "contributions_from_manifest",
    "index_manifest",
    "mix_weights",
    "open_index",
    "write_index",
]
