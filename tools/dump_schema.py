"""Writes sql/chunkq.sql: the chunkq schema as migrations/ leave it, read from the catalogs, in one readable file.

Every type, table, index, trigger, view and function of schema chunkq with its full text, comments and grants,
sorted by kind, then name. The text is the same on every PostgreSQL version chunkq supports (15 to 18): where
the catalogs' own text differs between versions, it is normalised below. tests/migrations/test_schema_dump.py
fails when the committed file is stale.

    python tools/dump_schema.py             # migrate a scratch database, rewrite sql/chunkq.sql
    python tools/dump_schema.py --check     # exit 1 (with the diff) if sql/chunkq.sql is out of date
    python tools/dump_schema.py --dsn DSN   # print the dump of a database that is migrated already

The scratch database is made on $CHUNKQ_TEST_DSN when set (a role that may CREATE DATABASE; it is dropped
afterwards), else on a throwaway embedded PostgreSQL. `./dev gen` runs this with tools/gen_sync.py.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "sql" / "chunkq.sql"
SCHEMA = "chunkq"

HEADER = """\
-- chunkq: the schema as migrations/ leave it.
--
-- Generated from migrations/ by tools/dump_schema.py: do not edit. `./dev gen` regenerates it, and
-- tests/migrations/test_schema_dump.py fails when it is stale, so the diff of a migration shows here what it
-- changes in the API. It is for reading, not for running: the migrations create the schema.
--
-- In order: the schema, the roles it grants to, types, tables (each with its indexes and triggers), views,
-- functions; by name within each kind. Every object comes with its comments and its grants to roles and
-- PUBLIC (the owner's own privileges are left out: they depend on who ran the migrations).
"""

ObjectKey = tuple[str, int, int]  # (catalog, oid, sub-id): how pg_description and ACLs name an object


class Unsupported(Exception):
    """The schema holds something this tool does not know how to write out."""


def dump(conn: psycopg.Connection[Any]) -> str:
    """The text of sql/chunkq.sql for the database ``conn`` is connected to."""
    with conn.transaction(force_rollback=True):  # a read: it leaves the caller's session as it was
        # Every name outside pg_catalog comes out schema-qualified, whatever the caller's search_path.
        conn.execute("SET LOCAL search_path = pg_catalog")
        return _Dumper(conn).dump()


def _q(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


def literal(text: str, prefix: str) -> str:
    """``prefix`` followed by ``text`` as an SQL string, on one line if it fits in 120 characters, else as
    adjacent literals of at most 110 characters, one per line (SQL concatenates them, as the migrations do)."""
    one_line = f"{prefix} '{text.replace(chr(39), chr(39) * 2)}';"
    if len(one_line) <= 120 and "\n" not in text:
        return one_line
    pieces: list[str] = []
    for line in text.splitlines(keepends=True):
        piece = ""
        for word in re.findall(r"\S*\s*", line):
            if piece and len(piece) + len(word) > 110:
                pieces.append(piece)
                piece = ""
            piece += word
        if piece:
            pieces.append(piece)
    quoted = ["    '" + piece.replace("'", "''") + "'" for piece in pieces]
    return prefix + "\n" + "\n".join(quoted) + ";"


def section(title: str) -> str:
    rule = "-- " + "-" * 75
    return f"{rule}\n-- {title}\n{rule}"


class _Dumper:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.version = conn.info.server_version
        self.comments = self._comments()
        self.grants = self._grants()
        self.grantees = sorted({grantee for grants in self.grants.values() for grantee, _, _ in grants} - {"PUBLIC"})

    # -- what every object carries: comments and grants -------------------------------------------------------

    def _comments(self) -> dict[ObjectKey, str]:
        """Every comment on an object of the schema; the writers take theirs, and any left is an error."""
        rows = _q(
            self.conn,
            """
            SELECT d.classoid::regclass::text, d.objoid::bigint, d.objsubid, d.description
              FROM pg_description d
             WHERE (d.classoid = 'pg_namespace'::regclass AND d.objoid = %(schema)s::regnamespace)
                OR (d.classoid = 'pg_class'::regclass
                    AND d.objoid IN (SELECT oid FROM pg_class WHERE relnamespace = %(schema)s::regnamespace))
                OR (d.classoid = 'pg_type'::regclass
                    AND d.objoid IN (SELECT oid FROM pg_type WHERE typnamespace = %(schema)s::regnamespace))
                OR (d.classoid = 'pg_proc'::regclass
                    AND d.objoid IN (SELECT oid FROM pg_proc WHERE pronamespace = %(schema)s::regnamespace))
                OR (d.classoid = 'pg_constraint'::regclass
                    AND d.objoid IN (SELECT oid FROM pg_constraint WHERE connamespace = %(schema)s::regnamespace))
                OR (d.classoid = 'pg_trigger'::regclass
                    AND d.objoid IN (SELECT t.oid FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                                      WHERE c.relnamespace = %(schema)s::regnamespace))
            """,
            {"schema": SCHEMA},
        )
        return {(catalog, oid, subid): text for catalog, oid, subid, text in rows}

    def _grants(self) -> dict[ObjectKey, list[tuple[str, str, bool]]]:
        """(grantee, privileges, grantable) of every object, but the owner's. A NULL ACL means the default
        one (PUBLIC may execute a new function), so that is what is exploded. All the privileges an object of
        its kind can have come out as ALL: PostgreSQL 17 added MAINTAIN to a table's, so a GRANT ALL would
        otherwise read differently on 15 and 18."""
        rows = _q(
            self.conn,
            """
            WITH objects (catalog, oid, subid, kind, owner, acl) AS (
                SELECT 'pg_namespace', n.oid, 0, 'n', n.nspowner, n.nspacl
                  FROM pg_namespace n WHERE n.nspname = %(schema)s
                UNION ALL
                SELECT 'pg_class', c.oid, 0, CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END, c.relowner, c.relacl
                  FROM pg_class c WHERE c.relnamespace = %(schema)s::regnamespace AND c.relkind IN ('r', 'v', 'S')
                UNION ALL
                SELECT 'pg_class', c.oid, a.attnum, 'c', c.relowner, a.attacl
                  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
                 WHERE c.relnamespace = %(schema)s::regnamespace AND a.attacl IS NOT NULL
                UNION ALL
                SELECT 'pg_proc', p.oid, 0, 'f', p.proowner, p.proacl
                  FROM pg_proc p WHERE p.pronamespace = %(schema)s::regnamespace
                UNION ALL
                SELECT 'pg_type', t.oid, 0, 'T', t.typowner, t.typacl
                  FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid
                 WHERE t.typnamespace = %(schema)s::regnamespace AND (t.typtype = 'e' OR c.relkind = 'c')
            )
            SELECT o.catalog, o.oid::bigint, o.subid,
                   CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                   a.is_grantable, array_agg(a.privilege_type ORDER BY a.privilege_type),
                   count(*) > 1 AND count(*) = (SELECT count(*) FROM aclexplode(acldefault(o.kind::"char", o.owner)) d
                                                 WHERE d.grantee = o.owner)
              FROM objects o, aclexplode(coalesce(o.acl, acldefault(o.kind::"char", o.owner))) a
             WHERE a.grantee <> o.owner
             GROUP BY o.catalog, o.oid, o.subid, o.kind, o.owner, a.grantee, a.is_grantable
            """,
            {"schema": SCHEMA},
        )
        grants: dict[ObjectKey, list[tuple[str, str, bool]]] = defaultdict(list)
        for catalog, oid, subid, grantee, grantable, privileges, every in rows:
            grants[(catalog, oid, subid)].append((grantee, "ALL" if every else ", ".join(privileges), grantable))
        return grants

    def comment(self, key: ObjectKey, target: str) -> list[str]:
        text = self.comments.pop(key, None)
        return [] if text is None else [literal(text, f"COMMENT ON {target} IS")]

    def grant(self, key: ObjectKey, target: str, columns: dict[int, str] | None = None) -> list[str]:
        """GRANT statements for ``key`` and, for a table or view, its columns: one per grantee."""
        lines = []
        for grantee, privileges, grantable in sorted(self.grants.pop(key, [])):
            lines.append(f"GRANT {privileges} ON {target} TO {grantee}{' WITH GRANT OPTION' if grantable else ''};")
        for attnum, column in sorted((columns or {}).items()):
            for grantee, privileges, grantable in sorted(self.grants.pop((key[0], key[1], attnum), [])):
                option = " WITH GRANT OPTION" if grantable else ""
                lines.append(f"GRANT {privileges} ({column}) ON {target} TO {grantee}{option};")
        return lines

    # -- the dump ---------------------------------------------------------------------------------------------

    def dump(self) -> str:
        self.check_supported()
        parts = [HEADER.rstrip("\n"), section("Schema"), self.schema()]
        for title, blocks in (
            ("Roles (cluster-wide: those the schema grants to, and their memberships among themselves)", self.roles()),
            ("Types", self.enums() + self.composite_types()),
            ("Tables", self.tables()),
            ("Views", self.views()),
            ("Functions", self.functions()),
        ):
            if blocks:
                parts.append(section(title))
                parts += blocks
        leftovers = [("comment on", key) for key in self.comments] + [("grant on", key) for key in self.grants]
        if leftovers:
            what = [f"{label} {self.describe(key)}" for label, key in leftovers]
            raise Unsupported(f"dump_schema.py does not know where to write: {'; '.join(what)}")
        return "\n\n".join(parts) + "\n"

    def describe(self, key: ObjectKey) -> str:
        return str(_q(self.conn, "SELECT pg_describe_object(%s::regclass, %s, %s)", key)[0][0])

    def check_supported(self) -> None:
        """Refuses a schema with objects this tool would silently leave out."""
        found = _q(
            self.conn,
            """
            SELECT 'relation ' || relname || ' of kind ' || relkind::text FROM pg_class
             WHERE relnamespace = %(schema)s::regnamespace AND relkind NOT IN ('r', 'v', 'i', 'S', 'c')
            UNION ALL
            SELECT 'sequence ' || s.relname || ' not owned by an identity column' FROM pg_class s
             WHERE s.relnamespace = %(schema)s::regnamespace AND s.relkind = 'S'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid
                                                           AND d.deptype = 'i')
            UNION ALL
            SELECT 'type ' || t.typname || ' of kind ' || t.typtype::text FROM pg_type t
             WHERE t.typnamespace = %(schema)s::regnamespace AND t.typtype NOT IN ('e', 'c')
               AND NOT (t.typtype = 'b' AND t.typelem <> 0 AND t.typsubscript = 'array_subscript_handler'::regproc)
            UNION ALL
            SELECT 'function ' || proname || ' of kind ' || prokind::text FROM pg_proc
             WHERE pronamespace = %(schema)s::regnamespace AND prokind NOT IN ('f', 'p')
            UNION ALL
            SELECT 'constraint ' || conname || ' of kind ' || contype::text FROM pg_constraint
             WHERE connamespace = %(schema)s::regnamespace AND (contype NOT IN ('c', 'f', 'p', 'u', 'x', 'n')
                                                                OR conrelid = 0)
            UNION ALL
            SELECT 'row security or inheritance on ' || c.relname FROM pg_class c
             WHERE c.relnamespace = %(schema)s::regnamespace
               AND (c.relrowsecurity OR c.relhassubclass OR c.relispartition
                    OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid))
            UNION ALL
            SELECT 'rule ' || r.rulename || ' on ' || c.relname FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
             WHERE c.relnamespace = %(schema)s::regnamespace AND r.rulename <> '_RETURN'
            UNION ALL
            SELECT 'default privileges in the schema' FROM pg_default_acl
             WHERE defaclnamespace = %(schema)s::regnamespace
            UNION ALL
            SELECT 'object ' || objid || ' of catalog ' || classid::regclass::text FROM pg_depend
             WHERE refclassid = 'pg_namespace'::regclass AND refobjid = %(schema)s::regnamespace
               AND classid NOT IN ('pg_class'::regclass, 'pg_type'::regclass, 'pg_proc'::regclass)
            """,
            {"schema": SCHEMA},
        )
        if found:
            raise Unsupported("dump_schema.py cannot dump: " + "; ".join(sorted(row[0] for row in found)))

    def schema(self) -> str:
        oid = _q(self.conn, "SELECT %s::regnamespace::oid::bigint", (SCHEMA,))[0][0]
        key = ("pg_namespace", oid, 0)
        target = f"SCHEMA {SCHEMA}"
        return "\n".join([f"CREATE {target};", *self.comment(key, target), *self.grant(key, target)])

    def roles(self) -> list[str]:
        """The roles that hold a privilege in the schema: their comments and memberships among themselves.
        Their attributes (LOGIN, ...) are left out: they are the cluster's business, not the migrations'."""
        if not self.grantees:
            return []
        roles = _q(
            self.conn,
            "SELECT quote_ident(rolname), shobj_description(oid, 'pg_authid') FROM pg_roles"
            " WHERE quote_ident(rolname) = ANY(%s)",
            (self.grantees,),
        )
        # DISTINCT: from PostgreSQL 16 on, a membership granted by two grantors is two rows.
        memberships = _q(
            self.conn,
            """
            SELECT DISTINCT quote_ident(m.rolname), quote_ident(g.rolname), a.admin_option
              FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
             WHERE quote_ident(g.rolname) = ANY(%(names)s) AND quote_ident(m.rolname) = ANY(%(names)s)
            """,
            {"names": self.grantees},
        )
        blocks = []
        for name, description in sorted(roles):
            lines = [f"CREATE ROLE {name};"]
            if description is not None:
                lines.append(literal(description, f"COMMENT ON ROLE {name} IS"))
            lines += [
                f"GRANT {role} TO {name}{' WITH ADMIN OPTION' if admin else ''};"
                for member, role, admin in sorted(memberships)
                if member == name
            ]
            blocks.append("\n".join(lines))
        return blocks

    def enums(self) -> list[str]:
        rows = _q(
            self.conn,
            """
            SELECT t.oid::bigint, t.oid::regtype::text, array_agg(quote_literal(e.enumlabel) ORDER BY e.enumsortorder)
              FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
             WHERE t.typnamespace = %(schema)s::regnamespace
             GROUP BY t.oid
            """,
            {"schema": SCHEMA},
        )
        blocks = []
        for oid, name, labels in sorted(rows, key=lambda row: row[1]):
            key = ("pg_type", oid, 0)
            definition = f"CREATE TYPE {name} AS ENUM ({', '.join(labels)});"
            if len(definition) > 120:
                definition = f"CREATE TYPE {name} AS ENUM (\n" + ",\n".join(f"    {label}" for label in labels) + "\n);"
            blocks.append("\n".join([definition, *self.comment(key, f"TYPE {name}"), *self.grant(key, f"TYPE {name}")]))
        return blocks

    def columns(self, relid: int) -> list[tuple[Any, ...]]:
        """(attnum, name, type, not null, identity, generated, default, collation) in the table's order."""
        return _q(
            self.conn,
            """
            SELECT a.attnum, quote_ident(a.attname), format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid, true),
                   CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END
              FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum
            """,
            (relid,),
        )

    def column_comments(self, relid: int, name: str, columns: list[tuple[Any, ...]]) -> list[str]:
        return [
            line
            for attnum, column, *_ in columns
            for line in self.comment(("pg_class", relid, attnum), f"COLUMN {name}.{column}")
        ]

    def composite_types(self) -> list[str]:
        rows = _q(
            self.conn,
            """
            SELECT t.oid::bigint, t.typrelid::bigint, t.oid::regtype::text
              FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
             WHERE t.typnamespace = %(schema)s::regnamespace AND c.relkind = 'c'
            """,
            {"schema": SCHEMA},
        )
        blocks = []
        for oid, relid, name in sorted(rows, key=lambda row: row[2]):
            columns = self.columns(relid)
            attributes = [
                f"    {column} {type_}" + (f" COLLATE {collation}" if collation else "")
                for _, column, type_, *_, collation in columns
            ]
            key = ("pg_type", oid, 0)
            lines = [f"CREATE TYPE {name} AS (\n" + ",\n".join(attributes) + "\n);"]
            lines += self.comment(key, f"TYPE {name}") + self.column_comments(relid, name, columns)
            blocks.append("\n".join(lines + self.grant(key, f"TYPE {name}")))
        return blocks

    def tables(self) -> list[str]:
        rows = _q(
            self.conn,
            """
            SELECT c.oid::bigint, c.oid::regclass::text, c.relpersistence = 'u',
                   ARRAY(SELECT unnest(c.reloptions) UNION ALL SELECT 'toast.' || unnest(t.reloptions))
              FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
             WHERE c.relnamespace = %(schema)s::regnamespace AND c.relkind = 'r'
            """,
            {"schema": SCHEMA},
        )
        blocks = []
        for relid, name, unlogged, options in sorted(rows, key=lambda row: row[1]):
            blocks.append(self.table(relid, name, unlogged, options))
            blocks += self.indexes(relid)
            blocks += self.triggers(relid, name)
        return blocks

    def table(self, relid: int, name: str, unlogged: bool, options: list[str]) -> str:
        columns = self.columns(relid)
        lines = []
        for _, column, type_, not_null, identity, generated, default, collation in columns:
            line = f"    {column} {type_}"
            if collation:
                line += f" COLLATE {collation}"
            if not_null:
                line += " NOT NULL"
            if identity:
                line += " GENERATED " + ("ALWAYS" if identity == "a" else "BY DEFAULT") + " AS IDENTITY"
            elif generated:
                line += f" GENERATED ALWAYS AS ({default}) " + ("STORED" if generated == "s" else "VIRTUAL")
            elif default is not None:
                line += f" DEFAULT {default}"
            lines.append(line)
        # PostgreSQL 18 also lists every NOT NULL as a constraint (contype 'n', named <table>_<column>_not_null);
        # 15 only marks the column. The column's NOT NULL above says it on both.
        constraints = _q(
            self.conn,
            """
            SELECT oid::bigint, quote_ident(conname), pg_get_constraintdef(oid, true) FROM pg_constraint
             WHERE conrelid = %s AND contype <> 'n'
            """,
            (relid,),
        )
        constraints.sort(key=lambda row: row[1])
        lines += [f"    CONSTRAINT {conname} {definition}" for _, conname, definition in constraints]
        with_options = f" WITH ({', '.join(sorted(options))})" if options else ""
        unlogged_ = "UNLOGGED " if unlogged else ""
        statements = [f"CREATE {unlogged_}TABLE {name} (\n" + ",\n".join(lines) + f"\n){with_options};"]
        statements += self.comment(("pg_class", relid, 0), f"TABLE {name}")
        statements += self.column_comments(relid, name, columns)
        for oid, conname, _ in constraints:
            statements += self.comment(("pg_constraint", oid, 0), f"CONSTRAINT {conname} ON {name}")
        statements += self.grant(("pg_class", relid, 0), f"TABLE {name}", {c[0]: c[1] for c in columns})
        for seq, seq_name in _q(
            self.conn,
            """
            SELECT s.oid::bigint, s.oid::regclass::text FROM pg_class s
              JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid AND d.deptype = 'i'
             WHERE s.relkind = 'S' AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %s
            """,
            (relid,),
        ):  # identity sequences: rarely commented or granted on, but if they are, here
            statements += self.comment(("pg_class", seq, 0), f"SEQUENCE {seq_name}")
            statements += self.grant(("pg_class", seq, 0), f"SEQUENCE {seq_name}")
        return "\n".join(statements)

    def indexes(self, relid: int) -> list[str]:
        """The table's indexes but those of its PRIMARY KEY, UNIQUE and EXCLUDE constraints (shown with it)."""
        rows = _q(
            self.conn,
            """
            SELECT i.indexrelid::bigint, i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
              FROM pg_index i
             WHERE i.indrelid = %s
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid
                                                              AND k.contype IN ('p', 'u', 'x'))
            """,
            (relid,),
        )
        return [
            "\n".join([f"{definition};", *self.comment(("pg_class", oid, 0), f"INDEX {name}")])
            for oid, name, definition in sorted(rows, key=lambda row: row[1])
        ]

    def triggers(self, relid: int, table: str) -> list[str]:
        rows = _q(
            self.conn,
            """
            SELECT oid::bigint, quote_ident(tgname), pg_get_triggerdef(oid, true), tgenabled FROM pg_trigger
             WHERE tgrelid = %s AND NOT tgisinternal
            """,
            (relid,),
        )
        blocks = []
        for oid, name, definition, enabled in sorted(rows, key=lambda row: row[1]):
            lines = [f"{definition};"]
            state = {"D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}.get(enabled)
            if state:
                lines.append(f"ALTER TABLE {table} {state} TRIGGER {name};")
            blocks.append("\n".join(lines + self.comment(("pg_trigger", oid, 0), f"TRIGGER {name} ON {table}")))
        return blocks

    def views(self) -> list[str]:
        rows = _q(
            self.conn,
            """
            SELECT c.oid::bigint, c.oid::regclass::text, c.reloptions, pg_get_viewdef(c.oid, true)
              FROM pg_class c WHERE c.relnamespace = %(schema)s::regnamespace AND c.relkind = 'v'
            """,
            {"schema": SCHEMA},
        )
        blocks = []
        for relid, name, options, definition in sorted(rows, key=lambda row: row[1]):
            if self.version < 160000:
                definition = unqualify_single_relation(definition)
            with_options = f" WITH ({', '.join(sorted(options))})" if options else ""
            key = ("pg_class", relid, 0)
            columns = self.columns(relid)
            lines = [f"CREATE VIEW {name}{with_options} AS\n{definition.rstrip().rstrip(';')};"]
            lines += self.comment(key, f"VIEW {name}") + self.column_comments(relid, name, columns)
            blocks.append("\n".join(lines + self.grant(key, f"TABLE {name}", {c[0]: c[1] for c in columns})))
        return blocks

    def functions(self) -> list[str]:
        # pg_get_functiondef gives the body as written (prosrc) and a header that is the same on 15 and 18.
        # (A body in standard SQL, BEGIN ATOMIC, would be deparsed instead; chunkq writes none.)
        rows = _q(
            self.conn,
            """
            SELECT p.oid::bigint, p.oid::regproc::text, p.prokind,
                   ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY AS a (t, n) ORDER BY n),
                   pg_get_functiondef(p.oid)
              FROM pg_proc p WHERE p.pronamespace = %(schema)s::regnamespace
            """,
            {"schema": SCHEMA},
        )
        blocks = []
        for oid, name, kind, arguments, definition in sorted(rows, key=lambda row: (row[1], row[3])):
            target = f"{'PROCEDURE' if kind == 'p' else 'FUNCTION'} {name}({', '.join(arguments)})"
            key = ("pg_proc", oid, 0)
            definition = sort_settings(definition.rstrip())
            blocks.append("\n".join([f"{definition};", *self.comment(key, target), *self.grant(key, target)]))
        return blocks


def sort_settings(functiondef: str) -> str:
    """pg_get_functiondef with its SET lines in name order: they come in the order they were set (proconfig),
    which has no effect and differs between a function created with both and one altered later."""
    header, separator, body = functiondef.partition("\nAS ")
    lines = header.split("\n")
    where = [n for n, line in enumerate(lines) if line.startswith(" SET ")]
    for n, line in zip(where, sorted(lines[n] for n in where), strict=True):
        lines[n] = line
    return "\n".join(lines) + separator + body


# -- pg_get_viewdef before PostgreSQL 16 ----------------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<string>[Ee]'(?:[^'\\]|''|\\.)*'|'(?:[^']|'')*')
      | (?P<name>"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)
      | (?P<number>\d+(?:\.\d*)?(?:[Ee][+-]?\d+)?)
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_FROM_ENDS = {"WHERE", "GROUP", "HAVING", "WINDOW", "ORDER", "LIMIT", "OFFSET", "FETCH", "FOR"}
_SET_OPERATIONS = {"UNION", "INTERSECT", "EXCEPT"}
_SUBQUERY_STARTS = {"SELECT", "WITH", "VALUES", "TABLE"}


def unqualify_single_relation(viewdef: str) -> str:
    """pg_get_viewdef as PostgreSQL 16 and later write it, from the text of 15 or earlier.

    A view's stored query used to carry two placeholder range-table entries (OLD and NEW), so the deparser
    always saw several relations and qualified every column (``c.id``); PostgreSQL 16 dropped them, and a view
    over a single relation now comes out unqualified (``id``) at its top level. Sub-queries are qualified in
    both. So: when the top-level FROM names one relation (a table, a function, a sub-query) and there is no
    UNION, INTERSECT or EXCEPT, drop ``alias.`` before a column name everywhere outside a sub-query.
    tests/migrations/test_schema_dump.py, run on 15 and 18, checks that the result is 18's text.
    """
    tokens = [(m.lastgroup or "", m.group()) for m in _TOKEN.finditer(viewdef)]
    significant = [i for i, (kind, _) in enumerate(tokens) if kind != "space"]
    outside = [True] * len(tokens)  # of a name: no enclosing parenthesis opens a sub-query
    top_level: list[int] = []  # significant tokens outside every parenthesis, parentheses opened there included
    stack: list[bool] = []  # per open parenthesis: does it open a sub-query?
    opens_subquery: set[int] = set()
    for n, i in enumerate(significant):
        text = tokens[i][1]
        if text == ")" and stack:
            stack.pop()
        if not stack and text != ")":
            top_level.append(i)
        if text == "(":
            following = tokens[significant[n + 1]][1].upper() if n + 1 < len(significant) else ""
            stack.append(following in _SUBQUERY_STARTS)
            if stack[-1]:
                opens_subquery.add(i)
        outside[i] = not any(stack)
    words = [tokens[i][1].upper() for i in top_level]
    if any(word in _SET_OPERATIONS for word in words):
        return viewdef
    froms = [n for n, word in enumerate(words) if word == "FROM" and (n == 0 or words[n - 1] != "DISTINCT")]
    if len(froms) != 1:
        return viewdef
    clause: list[int] = []  # the top-level tokens of the FROM clause
    for i in top_level[froms[0] + 1 :]:
        if tokens[i][1].upper() in _FROM_ENDS or tokens[i][1] == ";":
            break
        clause.append(i)
    for n, i in enumerate(clause):
        text = tokens[i][1]
        if text == "," or text.upper() == "JOIN":
            return viewdef  # several relations: qualified on every version
        if text == "(" and i not in opens_subquery and (n == 0 or tokens[clause[n - 1]][0] != "name"):
            return viewdef  # a parenthesised join
    names = [tokens[i][1] for i in clause if tokens[i][0] == "name" and tokens[i][1].upper() not in {"ONLY", "AS"}]
    if not names:
        return viewdef
    alias = names[-1]
    drop: set[int] = set()
    for i in range(len(tokens) - 2):
        if (
            outside[i]
            and tokens[i] == ("name", alias)
            and tokens[i + 1][1] == "."
            and tokens[i + 2][0] == "name"
            and (i == 0 or tokens[i - 1][1] != ".")
        ):
            drop |= {i, i + 1}
    return "".join(text for i, (_, text) in enumerate(tokens) if i not in drop)


# -- the command ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty database on $CHUNKQ_TEST_DSN's server (dropped afterwards), else on an embedded server."""
    admin = os.environ.get("CHUNKQ_TEST_DSN")
    if not admin:
        from chunkq.embedded import embedded_server

        with embedded_server() as dsn:
            yield dsn
        return
    name = f"chunkq_dump_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin, dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def generated() -> str:
    """The dump of a fresh database migrated with migrations/."""
    import chunkq

    with scratch_database() as dsn:
        chunkq.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            return dump(conn)


def stale_diff(expected: str, actual: str) -> str:
    """A unified diff from the committed sql/chunkq.sql to what the migrations give."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            "sql/chunkq.sql (committed)",
            "sql/chunkq.sql (from migrations/)",
        )
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1, with the diff, if sql/chunkq.sql is stale")
    parser.add_argument("--dsn", help="print the dump of this database (migrated already) instead")
    args = parser.parse_args(argv)
    if args.dsn:
        with psycopg.connect(args.dsn) as conn:
            sys.stdout.write(dump(conn))
        return 0
    actual = generated()
    committed = TARGET.read_text() if TARGET.exists() else ""
    if actual == committed:
        return 0
    if args.check:
        sys.stderr.write(stale_diff(committed, actual))
        print("sql/chunkq.sql is out of date: run ./dev gen", file=sys.stderr)
        return 1
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(actual)
    print("wrote sql/chunkq.sql")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
