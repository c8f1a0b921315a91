"""Publishing epoch exports where mirrors keep them, so auditors need nothing from the operator but that place.

    pub = ExportPublisher.for_template(cfg.settlement.export_uri, domain)   # None: nothing the node can write
    pub.publish(log, n)                    # writes canonical_export(log, n) to the template's path for epoch n

`[settlement] export_uri` is a template with `{epoch}` (and optionally `{chainId}`, `{ledger}`, `{operator}`),
the same one `loraledger audit` reads. When it names a local path or a `file://` URI the node writes each epoch's
canonical export there when its submission is signed, before it is broadcast (auditors and the guardian's
watcher need it during the challenge delay). The write is atomic (a temporary file renamed into place), so a
mirror syncing the folder never copies half an export. An `http(s)://` template is read by auditors only: the
operator uploads there (the node also serves every export over gRPC `GetEpochExport`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraledger.node.ledger.export import canonical_export
from loraledger.node.ledger.records import RecordDomain

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportPublisher:
    """Writes built epochs' canonical exports to a local path template (module docstring)."""

    template: str
    domain: RecordDomain

    @classmethod
    def for_template(cls, template: str, domain: RecordDomain) -> ExportPublisher | None:
        """The publisher for a local `template`; None for an empty or remote (http, https, ...) one."""
        if not template or ("://" in template and not template.startswith("file://")):
            return None
        return cls(template.removeprefix("file://"), domain)

    def path(self, n: int) -> Path:
        """Where epoch `n`'s export goes: the template filled in as auditors fill it (`watch.expand_template`)."""
        from loraledger.node.ledger.watch import expand_template

        d = self.domain
        return Path(expand_template(self.template, chain_id=d.chain_id, ledger=d.ledger, operator=d.operator,
                                    epoch=n))

    def publish(self, log_: RecordLog, n: int, data: bytes | None = None) -> Path:
        """Write epoch `n`'s canonical export (`data` when the caller has it) atomically; return where."""
        out = self.path(n)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(canonical_export(log_, n) if data is None else data)
        tmp.replace(out)
        log.info("epoch %d: export published to %s", n, out)
        return out
