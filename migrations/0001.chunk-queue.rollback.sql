-- Rolls back 0001: removes the chunk queue and everything in it.
DROP SCHEMA chunkq CASCADE;
