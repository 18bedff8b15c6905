"""``hark clients``: broker logins for a tenant's own Kafka consumers and producers (hark/clients.py),
made, listed and revoked as the running stack's admin."""

from __future__ import annotations

import json
import sys

from hark import clients

from .common import add_bootstrap, connect, settings_of


def cmd_create(a) -> int:
    s = connect(a, settings_of(a))
    try:
        login = clients.create(s, a.name, a.tenant, consume=a.consume, produce=a.produce)
    except clients.ClientError as e:
        raise SystemExit(f"hark: {e}") from None
    print(json.dumps(login, indent=1))
    print(
        f"hark: client {login['username']} created; its password is shown only here (revoke and create again "
        "to replace it)",
        file=sys.stderr,
    )
    return 0


def cmd_list(a) -> int:
    found = clients.list_clients(connect(a, settings_of(a)))
    if a.json:
        print(json.dumps([clients.as_dict(c) for c in found], indent=1))
        return 0
    if not found:
        print("hark: no clients (`hark clients create NAME --tenant T --consume`)", file=sys.stderr)
        return 0
    print(f"{'name':<24} {'tenant':<20} {'grants':<16} {'created':<20} notes")
    for c in found:
        notes = ([] if c.login else ["no login"]) + ([f"{c.other_acls} other ACLs"] if c.other_acls else [])
        grants = ",".join(c.grants) or "-"
        print(f"{c.name:<24} {c.tenant or '-':<20} {grants:<16} {c.created_at or '-':<20} {'; '.join(notes)}".rstrip())
    return 0


def cmd_revoke(a) -> int:
    try:
        gone = clients.revoke(connect(a, settings_of(a)), a.name)
    except clients.ClientError as e:
        raise SystemExit(f"hark: {e}") from None
    print(
        f"hark: client {gone.username} revoked: its password no longer works and its ACLs are deleted", file=sys.stderr
    )
    return 0


def add_parsers(sub) -> None:
    cl = sub.add_parser("clients", help="broker logins for a tenant's own Kafka consumers and producers")
    csub = cl.add_subparsers(dest="action", required=True)
    cr = csub.add_parser("create", help="a login held to one tenant's topics; prints it as JSON, password included")
    cr.add_argument("name", help="a-z, 0-9, _ and - (the login is client.NAME)")
    cr.add_argument("--tenant", required=True)
    cr.add_argument("--consume", action="store_true", help="may read the tenant's published transcripts")
    cr.add_argument("--produce", action="store_true", help="may write audio to the tenant's produce topic")
    cr.set_defaults(fn=cmd_create)
    ls = csub.add_parser("list", help="the clients the broker has logins or ACLs for (never passwords)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)
    rv = csub.add_parser("revoke", help="refuse a client's login from its next connection and remove every ACL of it")
    rv.add_argument("name")
    rv.set_defaults(fn=cmd_revoke)
    for sp in (cr, ls, rv):
        add_bootstrap(sp)
