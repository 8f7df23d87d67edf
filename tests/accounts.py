"""Users for tests of the routes: one per role, each with a personal API token, removed again afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import delete

from dicom_node.models import User, UserRole
from dicom_node.node import Node
from dicom_node.users import Users

PASSWORD = "correct horse battery staple"


@contextmanager
def accounts(node: Node, *roles: UserRole) -> Iterator[dict[UserRole, str]]:
    """Users named after their roles (``viewer``, ``operator``, ``admin``, all three by default) with the password
    :data:`PASSWORD`; yields each role's bearer header value. On exit the users go (the admin too, which the node
    itself refuses to remove), so the index is open again for the tests after."""
    users = Users(node.sessions, node.trail)
    tokens = {}
    try:
        for role in roles or tuple(UserRole):
            users.add(role.value, role, PASSWORD, actor="test")
            tokens[role] = f"Bearer {users.issue_token(role.value, 'test', 1, actor='test').secret}"
        yield tokens
    finally:
        with node.sessions.begin() as session:
            session.execute(delete(User).where(User.username.in_([role.value for role in tokens])))
