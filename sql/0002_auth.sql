-- Refresh tokens rotate: each is used once; presenting a used one revokes its family.
CREATE TABLE refresh_tokens (
    jti         text PRIMARY KEY,
    family      text NOT NULL,
    user_id     bigint NOT NULL REFERENCES users (id),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);
