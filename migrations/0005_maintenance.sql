-- Which tables of some schemas need a VACUUM or an ANALYZE now, by autovacuum's own rules and
-- default thresholds (vacuum: dead rows above 50 + 20 % of the table, or inserts since the last
-- vacuum above 1000 + 20 %; analyze: changes since the last analyze above 50 + 10 %).
--
-- Every process looks after the tables it writes with this, because autovacuum may be off or
-- slow to reach a table that churns. It matters for more than bloat: a prepared statement's
-- plan is made once, and a plan made while a table was nearly empty (a sequential scan) is
-- kept until the table's statistics change; the ANALYZE this asks for is what replaces it.
CREATE FUNCTION public.maintenance_due(schemas text[])
RETURNS TABLE (table_name text, needs_vacuum boolean, needs_analyze boolean)
LANGUAGE sql STABLE AS $$
    SELECT format('%I.%I', s.schemaname, s.relname),
           s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0)
               OR s.n_ins_since_vacuum > 1000 + 0.2 * greatest(c.reltuples, 0),
           s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)
      FROM pg_stat_user_tables s
      JOIN pg_class c ON c.oid = s.relid
     WHERE s.schemaname = ANY (schemas)
$$;
