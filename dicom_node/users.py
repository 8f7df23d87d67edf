"""Local users and their personal API tokens (docs/security.md).

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommended option); a token is
256 random bits shown once, and only its SHA-256 is kept, for a token cannot be guessed the way a password can.
Every change writes a ``user-changed`` audit event naming who made it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditRecord
from dicom_node.audit.trail import AuditTrail, now
from dicom_node.models import ApiToken, User, UserRole, as_utc

TOKEN_PREFIX = "dnt_"  # tells a personal token from a provider's access token, and makes a leaked one findable
MIN_PASSWORD_LENGTH = 12
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_hasher = PasswordHasher()
# Checked when the user name is unknown, so that an unknown name takes as long to refuse as a wrong password.
_UNKNOWN_USER_HASH = _hasher.hash(secrets.token_hex(16))


class UserError(ValueError):
    """A change that cannot be made; the message says why, in one line."""


@dataclass(frozen=True)
class Account:
    """Who signed in with a password or a personal token."""

    username: str
    role: UserRole
    credentials_changed_at: dt.datetime


@dataclass(frozen=True)
class IssuedToken:
    """A new token: ``secret`` is shown once and never kept."""

    id: int
    secret: str
    expires_at: dt.datetime


def check_username(username: str) -> str:
    if not _USERNAME.match(username):
        raise UserError(
            f"a user name is 1-64 letters, digits or . _ @ -, starting with a letter or digit: {username!r}"
        )
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    return password


class Users:
    """The local users of the index. ``actor`` names who makes a change (the CLI: the operating system user)."""

    def __init__(self, sessions: sessionmaker[Session], trail: AuditTrail) -> None:
        self._sessions = sessions
        self._trail = trail

    # --- the users --------------------------------------------------------------------------------------------

    def add(self, username: str, role: UserRole, password: str, actor: str) -> None:
        check_username(username)
        check_password(password)
        with self._sessions.begin() as session:
            if _user(session, username) is not None:
                raise UserError(f"there is already a user {username!r}")
            session.add(User(username=username, role=role, password_hash=_hasher.hash(password)))
        self._changed(actor, username, f"user added with role {role}")

    def remove(self, username: str, actor: str) -> None:
        with self._sessions.begin() as session:
            user = _existing(session, username)
            _keep_an_admin(session, user, UserRole.VIEWER)
            session.delete(user)
        self._changed(actor, username, "user removed, with its tokens")

    def set_role(self, username: str, role: UserRole, actor: str) -> None:
        with self._sessions.begin() as session:
            user = _existing(session, username)
            _keep_an_admin(session, user, role)
            before = user.role
            user.role, user.credentials_changed_at = role, now()
        self._changed(actor, username, f"role {before} -> {role}")

    def reset_password(self, username: str, password: str, actor: str) -> None:
        check_password(password)
        with self._sessions.begin() as session:
            user = _existing(session, username)
            user.password_hash, user.credentials_changed_at = _hasher.hash(password), now()
        self._changed(actor, username, "password reset; its sessions ended")

    def list(self) -> list[tuple[User, int]]:
        """Every user, with the number of its tokens that still work."""
        with self._sessions() as session:
            working = (
                select(ApiToken.user_pk, func.count().label("tokens"))
                .where(ApiToken.revoked_at.is_(None), ApiToken.expires_at > now())
                .group_by(ApiToken.user_pk)
                .subquery()
            )
            rows = session.execute(
                select(User, func.coalesce(working.c.tokens, 0))
                .outerjoin(working, working.c.user_pk == User.id)
                .order_by(User.username)
            )
            return [(user, count) for user, count in rows]

    def any(self) -> bool:
        with self._sessions() as session:
            return session.scalar(select(User.id).limit(1)) is not None

    # --- signing in -------------------------------------------------------------------------------------------

    def check_password(self, username: str, password: str) -> Account | None:
        """The user, where ``password`` is theirs; None otherwise (in about the same time either way)."""
        with self._sessions() as session:
            user = _user(session, username)
            try:
                _hasher.verify(user.password_hash if user is not None else _UNKNOWN_USER_HASH, password)
            except (VerificationError, InvalidHashError):
                return None
            return _account(user) if user is not None else None

    def account(self, username: str) -> Account | None:
        """The user as the index holds it now: a session reads it on every request."""
        with self._sessions() as session:
            user = _user(session, username)
            return _account(user) if user is not None else None

    # --- personal tokens --------------------------------------------------------------------------------------

    def issue_token(self, username: str, name: str, days: float, actor: str) -> IssuedToken:
        if not 0 < days <= 366:
            raise UserError("a token lasts more than 0 and at most 366 days")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = now() + dt.timedelta(days=days)
        with self._sessions.begin() as session:
            user = _existing(session, username)
            token = ApiToken(user=user, name=name[:64], digest=_digest(secret), expires_at=expires_at)
            session.add(token)
            session.flush()
            token_id = token.id
        self._changed(actor, username, f"token {token_id} ({name[:64]}) issued, expires {expires_at:%Y-%m-%d}")
        return IssuedToken(token_id, secret, expires_at)

    def revoke_token(self, token_id: int, actor: str) -> None:
        with self._sessions.begin() as session:
            token = session.get(ApiToken, token_id)
            if token is None or token.revoked_at is not None:
                raise UserError(f"there is no working token {token_id}")
            token.revoked_at = now()
            username = token.user.username
        self._changed(actor, username, f"token {token_id} revoked")

    def tokens(self, username: str) -> list[ApiToken]:
        with self._sessions() as session:
            return list(_existing(session, username).tokens)

    def check_token(self, secret: str) -> Account | None:
        """The token's user, where the token is known, not revoked and not expired."""
        with self._sessions() as session:
            token = session.scalar(select(ApiToken).where(ApiToken.digest == _digest(secret)))
            if token is None or not token.works_at(now()):
                return None
            return _account(token.user)

    def _changed(self, actor: str, username: str, detail: str) -> None:
        self._trail.record(
            AuditRecord(
                kind=AuditEventKind.USER_CHANGED,
                occurred_at=now(),
                user=actor,
                objects=(AuditObject(AuditObjectKind.USER, username),),
                detail=detail,
            )
        )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def _existing(session: Session, username: str) -> User:
    user = _user(session, username)
    if user is None:
        raise UserError(f"there is no user {username!r}")
    return user


def _account(user: User) -> Account:
    return Account(user.username, user.role, as_utc(user.credentials_changed_at))


def _keep_an_admin(session: Session, user: User, new_role: UserRole) -> None:
    """The last admin stays: without one, nobody could manage the users through the node's roles."""
    if user.role is UserRole.ADMIN and new_role is not UserRole.ADMIN:
        admins = session.scalar(select(func.count()).select_from(User).where(User.role == UserRole.ADMIN))
        if admins == 1:
            raise UserError(f"{user.username!r} is the last admin: make another user admin first")
