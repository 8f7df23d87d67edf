"""``dicom-node users ...`` and ``dicom-node audit ...``: local users, their tokens, and the audit trail."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.audit.record import AuditEventKind, AuditRecord
from dicom_node.audit.trail import AuditTrail, events_of_patient, exported, now, utc_time
from dicom_node.config import ConfigError, load_settings
from dicom_node.database import open_index, session_factory
from dicom_node.exit_codes import EXIT_CONFIG_ERROR, EXIT_START_FAILED
from dicom_node.index_schema import IndexNotReady, one_line
from dicom_node.models import UserRole
from dicom_node.users import UserError, Users

PASSWORD_VARIABLE = "NEW_USER_PASSWORD"  # for scripts; otherwise the password is asked for twice at the terminal
EXIT_CHAIN_BROKEN = 1


def add_access_commands(commands: argparse._SubParsersAction) -> None:
    users = commands.add_parser("users", help="local users, their roles and personal API tokens")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    roles = [role.value for role in UserRole]

    add = _command(user_commands, "add", "add a user (the password is asked for, or read from $NEW_USER_PASSWORD)")
    add.add_argument("username")
    add.add_argument("--role", choices=roles, required=True)
    add.set_defaults(run=_on_users(lambda users, args, actor: _add(users, args, actor)))

    remove = _command(user_commands, "remove", "remove a user and their tokens")
    remove.add_argument("username")
    remove.set_defaults(run=_on_users(lambda users, args, actor: users.remove(args.username, actor)))

    listing = _command(user_commands, "list", "list the users, their roles and working tokens")
    listing.set_defaults(run=_on_users(lambda users, args, actor: _list(users)))

    reset = _command(user_commands, "reset-password", "set a new password; the user's sessions end")
    reset.add_argument("username")
    reset.set_defaults(
        run=_on_users(lambda users, args, actor: users.reset_password(args.username, _password(), actor))
    )

    role = _command(user_commands, "set-role", "change a user's role; the user's sessions end")
    role.add_argument("username")
    role.add_argument("role", choices=roles)
    role.set_defaults(
        run=_on_users(lambda users, args, actor: users.set_role(args.username, UserRole(args.role), actor))
    )

    token = _command(user_commands, "token", "issue a personal API token (printed once)")
    token.add_argument("username")
    token.add_argument("--name", default="api", help="what the token is for")
    token.add_argument("--days", type=float, default=90, help="days until it expires (at most 366)")
    token.set_defaults(run=_on_users(lambda users, args, actor: _issue(users, args, actor)))

    tokens = _command(user_commands, "tokens", "list a user's personal API tokens: number, purpose, expiry, state")
    tokens.add_argument("username")
    tokens.set_defaults(run=_on_users(lambda users, args, actor: _tokens(users, args.username)))

    revoke = _command(user_commands, "revoke-token", "revoke a personal API token by its number")
    revoke.add_argument("token_id", type=int)
    revoke.set_defaults(run=_on_users(lambda users, args, actor: users.revoke_token(args.token_id, actor)))

    audit = commands.add_parser("audit", help="the audit trail: check its chain, export a patient's events")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    check = _command(audit_commands, "verify", "exit 1, naming each event where the hash chain breaks")
    check.set_defaults(run=_audit_verify_command)
    export = _command(audit_commands, "export", "print a patient's events as JSON lines, oldest first")
    export.add_argument("--patient", required=True, help="the PatientID")
    export.add_argument("--since", type=_date, required=True, help="YYYY-MM-DD or an ISO time (UTC unless given)")
    export.add_argument("--until", type=_date, help="before this time")
    export.set_defaults(run=_audit_export_command)


def _command(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    return command


def _on_users(change: Callable[[Users, argparse.Namespace, str], object]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        def with_users(sessions, trail) -> int:
            try:
                change(Users(sessions, trail), args, _actor())
            except UserError as error:
                print(f"dicom-node: {error}", file=sys.stderr)
                return EXIT_CONFIG_ERROR
            return 0

        return _on_index(args, with_users)

    return run


def _actor() -> str:
    """Who changes users from the command line: the operating system's user, as the audit event's user."""
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return f"uid {os.getuid()} (command line)"


def _password() -> str:
    if PASSWORD_VARIABLE in os.environ:
        return os.environ[PASSWORD_VARIABLE]
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ")
    return first


def _add(users: Users, args: argparse.Namespace, actor: str) -> None:
    users.add(args.username, UserRole(args.role), _password(), actor)
    print(f"user {args.username} added as {args.role}")


def _list(users: Users) -> None:
    for user, tokens in users.list():
        print(f"{user.username}\t{user.role}\t{tokens} working token(s)\tsince {user.created_at:%Y-%m-%d}")


def _tokens(users: Users, username: str) -> None:
    for token in users.tokens(username):
        if token.revoked_at is not None:
            state = f"revoked {token.revoked_at:%Y-%m-%d}"
        else:
            state = "works" if token.works_at(now()) else "expired"
        print(f"{token.id}\t{token.name}\texpires {token.expires_at:%Y-%m-%d}\t{state}")


def _issue(users: Users, args: argparse.Namespace, actor: str) -> None:
    token = users.issue_token(args.username, args.name, args.days, actor)
    print(f"token {token.id}, expires {token.expires_at:%Y-%m-%d %H:%M} UTC (shown once, keep it):")
    print(token.secret)


def _audit_verify_command(args: argparse.Namespace) -> int:
    def check(_sessions, trail: AuditTrail) -> int:
        count, breaks = trail.verify()
        for chain_break in breaks:
            print(chain_break)
        print(f"{count} events, {'the chain holds' if not breaks else f'{len(breaks)} problem(s)'}")
        return EXIT_CHAIN_BROKEN if breaks else 0

    return _on_index(args, check)


def _audit_export_command(args: argparse.Namespace) -> int:
    def export(sessions, trail: AuditTrail) -> int:
        with sessions() as session:
            for row in events_of_patient(session, args.patient, args.since, args.until):
                print(json.dumps(exported(row), ensure_ascii=False))
        trail.record(  # the export is an event of its own, after the events it lists (Audit Log Used)
            AuditRecord(
                kind=AuditEventKind.AUDIT_LOG_READ,
                occurred_at=now(),
                user=_actor(),
                patients=(args.patient,),
                detail=f"dicom-node audit export --since {args.since.isoformat()}",
            )
        )
        return 0

    return _on_index(args, export)


def _date(text: str) -> dt.datetime:
    try:
        return utc_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or ISO time: {text!r}") from None


def _on_index(args: argparse.Namespace, command: Callable) -> int:
    """Run ``command(sessions, trail)`` on the configured index, brought to the code's schema where allowed."""
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        engine = open_index(settings.database)
    except IndexNotReady as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_START_FAILED
    except (SQLAlchemyError, ImportError, OSError) as error:
        print(f"dicom-node: cannot use the index: {one_line(error)}", file=sys.stderr)
        return EXIT_START_FAILED
    trail = AuditTrail(settings.database, settings.storage.root)
    try:
        return command(session_factory(engine), trail)
    except SQLAlchemyError as error:
        print(f"dicom-node: cannot use the index: {one_line(error)}", file=sys.stderr)
        return EXIT_START_FAILED
    finally:
        trail.close()
        engine.dispose()
