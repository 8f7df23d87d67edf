"""The audit trail sent on to a syslog collector (``audit.syslog``) as DICOM audit messages (PS3.15 A.5).

The index is the spool: ``audit_forwarding`` keeps the id of the last event the collector took, and each pass
sends the events after it, oldest first. While the collector is away the events wait in the index, and they go
once it answers again; an event sent just before a crash, and not yet marked, is sent again (at least once).
One process forwards (the one that serves the web); several would send each event several times.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.dicom_message import dicom_audit_message
from dicom_node.audit.syslog import SyslogTlsSender, client_context
from dicom_node.audit.trail import as_record
from dicom_node.background import PollingThread
from dicom_node.config import AuditSyslogSettings
from dicom_node.models import AuditEvent, AuditForwarding

BATCH = 200


class AuditForwarder(PollingThread):
    def __init__(
        self, sessions: sessionmaker[Session], settings: AuditSyslogSettings, source_id: str, poll_interval: float = 1.0
    ) -> None:
        super().__init__("audit-forwarding", poll_interval)
        self._sessions = sessions
        self._source_id = source_id
        self.destination = f"{settings.host}:{settings.port}"
        context = client_context(settings.ca_file, settings.cert_file, settings.key_file)
        self._sender = SyslogTlsSender(settings.host, settings.port, context)

    def run_pass(self) -> bool:
        """Send the events after the mark; True where a whole batch went (more may wait)."""
        with self._sessions() as session:
            mark = session.get(AuditForwarding, self.destination)
            last_sent = mark.last_sent_id if mark is not None else 0
            rows = session.scalars(
                select(AuditEvent).where(AuditEvent.id > last_sent).order_by(AuditEvent.id).limit(BATCH)
            ).all()
            events = [(row.id, as_record(row)) for row in rows]
        sent_through = last_sent
        try:
            for event_id, record in events:
                self._sender.send(dicom_audit_message(record, self._source_id), record.occurred_at)
                sent_through = event_id
        finally:
            if sent_through > last_sent:
                with self._sessions.begin() as session:
                    session.merge(AuditForwarding(destination=self.destination, last_sent_id=sent_through))
        return len(events) == BATCH

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._sender.close()
