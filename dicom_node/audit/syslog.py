"""Audit messages to a syslog collector: RFC 5424 messages over TLS (RFC 5425), as DICOM PS3.15 A.6 and IHE ITI-20.

The header follows IHE ITI TF-2 3.20.4.1.2 (Record Audit Event) and PS3.15 A.6: facility 10 (security/authorization)
and severity 5 (notice), so PRI ``<85>``; MSGID ``IHE+RFC-3881``; no STRUCTURED-DATA. The MSG is the XML audit
message after a UTF-8 byte order mark, as RFC 5424 Section 6.4 marks a UTF-8 MSG. Each message travels in an
octet-counted frame, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 Section 4.3).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
from pathlib import Path

PRI = "<85>"  # facility 10 x 8 + severity 5
VERSION = "1"
MSGID = "IHE+RFC-3881"
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"

# The longest HOSTNAME and APP-NAME (RFC 5424 Section 6).
HOSTNAME_LENGTH = 255
APP_NAME_LENGTH = 48


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """A TLS client context for a syslog collector: TLS 1.2 or later (PS3.15 A.6), verifying its certificate.

    The collector's certificate must chain to ``ca_file`` (the system's CAs where None) and name the host connected to
    (RFC 5425 Section 5.2). ``cert_file`` and ``key_file`` (the key may be in ``cert_file``) are the node's own
    certificate, for a collector that authenticates its clients, as IHE ATNA's nodes do.
    """
    if key_file is not None and cert_file is None:
        raise ValueError("a key file without a certificate file")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def syslog_message(message: bytes, occurred_at: dt.datetime, *, hostname: str, app_name: str, procid: str) -> bytes:
    """The RFC 5424 SYSLOG-MSG that carries ``message`` (XML, UTF-8): HEADER, STRUCTURED-DATA ``-``, BOM and MSG.

    TIMESTAMP is ``occurred_at`` in UTC (RFC 5424 Section 6.2.3); ValueError where it has no time zone.
    """
    if occurred_at.utcoffset() is None:
        raise ValueError(f"the syslog TIMESTAMP has no time zone: {occurred_at.isoformat()}")
    timestamp = occurred_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = f"{PRI}{VERSION} {timestamp} {hostname} {app_name} {procid} {MSGID} {NILVALUE} "
    return header.encode("ascii") + BOM + message


def octet_counted(syslog_msg: bytes) -> bytes:
    """The frame of RFC 5425 Section 4.3: ``MSG-LEN SP SYSLOG-MSG``, MSG-LEN the octets of SYSLOG-MSG."""
    return b"%d %s" % (len(syslog_msg), syslog_msg)


class SyslogTlsSender:
    """Sends audit messages to one syslog collector over TLS (RFC 5425) on a connection kept between messages.

    Meant for the one thread that forwards the audit trail; :meth:`close` may come from another thread (at
    shutdown) and waits for a send under way. :meth:`send` raises OSError (ssl.SSLError among them) where the
    collector cannot be reached or refuses the connection, so that the caller keeps the message for a later try.

    A message counts as sent once TLS has taken it: syslog has no acknowledgement (RFC 5425 Section 4.1), so a
    collector that fails after that loses what it had not yet stored.
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        app_name: str = "dicom-node",
        timeout: float = 10.0,
    ) -> None:
        if not _is_header_field(app_name, APP_NAME_LENGTH):
            raise ValueError(f"not an RFC 5424 APP-NAME (1 to 48 printable US-ASCII characters): {app_name!r}")
        self.host = host
        self.port = port
        self.app_name = app_name
        self.timeout = timeout
        self._context = context
        self._hostname = _local_hostname()
        self._procid = str(os.getpid())
        self._socket: ssl.SSLSocket | None = None
        self._lock = threading.Lock()

    def send(self, message: bytes, occurred_at: dt.datetime) -> None:
        """Sends ``message`` (a DICOM audit message, UTF-8 XML) as a syslog message stamped ``occurred_at``.

        Connects where no connection is open. A connection that the collector closed, or that fails under the
        message, is replaced once by a new one.
        """
        frame = octet_counted(
            syslog_message(message, occurred_at, hostname=self._hostname, app_name=self.app_name, procid=self._procid)
        )
        with self._lock:
            if self._socket is not None and _closed_by_peer(self._socket, self.timeout):
                self._close()
            while True:
                kept = self._socket is not None
                try:
                    if self._socket is None:
                        self._socket = self._connect()
                    self._socket.sendall(frame)
                    return
                except OSError:
                    self._close()
                    if not kept:
                        raise

    def close(self) -> None:
        """Closes the connection, if one is open, waiting up to ``timeout`` for the collector to close its end.

        The next :meth:`send` opens another.
        """
        with self._lock:
            self._close()

    def _connect(self) -> ssl.SSLSocket:
        connection = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            return self._context.wrap_socket(connection, server_hostname=self.host)
        except BaseException:
            connection.close()
            raise

    def _close(self) -> None:
        """Ends the TLS session with close_notify (RFC 5425 Section 4.4), then closes the connection.

        The TLS shutdown also reads what the collector sent (session tickets): closing a socket with unread data
        resets the connection, and a reset can discard messages that the collector had not read yet.
        """
        if self._socket is None:
            return
        try:
            self._socket.unwrap()
        except OSError:
            pass  # the collector closed without close_notify, or is gone
        finally:
            self._socket.close()
            self._socket = None


def _closed_by_peer(connection: ssl.SSLSocket, timeout: float) -> bool:
    """Whether the collector has closed ``connection`` (or reset it).

    A collector sends nothing to its clients (RFC 5425), so anything to read is its end of the connection; the one
    exception, TLS 1.3 session tickets, is consumed by the TLS layer and leaves nothing to read. Without this check
    the first message after a collector's restart would go to a dead connection without an error.
    """
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True
    finally:
        connection.settimeout(timeout)


def _local_hostname() -> str:
    """HOSTNAME (RFC 5424 Section 6.2.4): this machine's FQDN, or the NILVALUE where it cannot be written."""
    hostname = socket.getfqdn()
    return hostname if _is_header_field(hostname, HOSTNAME_LENGTH) else NILVALUE


def _is_header_field(value: str, length: int) -> bool:
    """Whether ``value`` fits a header field: 1 to ``length`` printable US-ASCII characters (RFC 5424 Section 6)."""
    return 0 < len(value) <= length and all("!" <= character <= "~" for character in value)
