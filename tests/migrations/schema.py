"""A text description of the chunkq schema, read from the catalogs, for the committed snapshot.

It lists what a DBA relies on — tables, columns, constraints, indexes, types,
functions (signature, result, language, volatility, a hash of the body) — in a
form that is the same on every Postgres version chunkq supports.

    python -m tests.migrations.schema DSN > tests/migrations/schema.snapshot
"""

from __future__ import annotations

import sys

import psycopg

QUERIES = {
    "column": """
        SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
         WHERE n.nspname = 'chunkq' AND c.relkind IN ('r', 'v', 'm', 'p')
    """,
    "constraint": """
        SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint
         WHERE connamespace = 'chunkq'::regnamespace AND contype IN ('c', 'f', 'p', 'u', 'x') AND conrelid <> 0
    """,
    "index": """
        SELECT indexdef FROM pg_indexes WHERE schemaname = 'chunkq'
    """,
    "type": """
        SELECT t.typname || ' enum ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
          FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
         WHERE t.typnamespace = 'chunkq'::regnamespace GROUP BY t.typname
        UNION ALL
        SELECT t.typname || ' composite ' || string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                                                        ORDER BY a.attnum)
          FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'c'
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE t.typnamespace = 'chunkq'::regnamespace GROUP BY t.typname
    """,
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') -> '
               || pg_get_function_result(p.oid) || ' ' || l.lanname || ' '
               || CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END
               || CASE WHEN p.prosecdef THEN ' security definer' ELSE '' END
               || CASE WHEN cardinality(p.proconfig) > 0
                    THEN ' set ' || array_to_string(ARRAY(SELECT unnest(p.proconfig) ORDER BY 1), ', ') ELSE '' END
               || ' body ' || md5(p.prosrc)
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'chunkq'::regnamespace
    """,
    "trigger": """
        SELECT pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'chunkq'::regnamespace AND NOT t.tgisinternal
    """,
    "storage": """
        SELECT c.relname || ' ' || array_to_string(c.reloptions, ', ')
          FROM pg_class c WHERE c.relnamespace = 'chunkq'::regnamespace AND c.reloptions IS NOT NULL
    """,
    "comment": """
        SELECT c.relname || coalesce('.' || a.attname, '') || ' ' || md5(d.description)
          FROM pg_description d JOIN pg_class c ON d.classoid = 'pg_class'::regclass AND c.oid = d.objoid
          LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid AND d.objsubid > 0
         WHERE c.relnamespace = 'chunkq'::regnamespace
        UNION ALL
        SELECT p.oid::regprocedure::text || ' ' || md5(d.description)
          FROM pg_description d JOIN pg_proc p ON d.classoid = 'pg_proc'::regclass AND p.oid = d.objoid
         WHERE p.pronamespace = 'chunkq'::regnamespace
        UNION ALL
        SELECT c.relname || ' trigger ' || t.tgname || ' ' || md5(d.description)
          FROM pg_description d JOIN pg_trigger t ON d.classoid = 'pg_trigger'::regclass AND t.oid = d.objoid
          JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'chunkq'::regnamespace
    """,
}


def describe(conn: psycopg.Connection) -> str:
    lines = []
    for kind, query in QUERIES.items():
        lines += sorted(f"{kind} {row[0]}" for row in conn.execute(query))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with psycopg.connect(sys.argv[1]) as connection:
        sys.stdout.write(describe(connection))
