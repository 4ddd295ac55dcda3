"""Storage: PostgreSQL (every SQL statement of chatd, and the migrations) and Redis (one adapter, one error
policy, and what is built on it)."""
