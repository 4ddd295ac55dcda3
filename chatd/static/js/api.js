// REST under /api/v1 (docs/API.md): sign-in, token refresh serialized across tabs, JSON calls.
// Tokens live in localStorage so a reload (or another tab) stays signed in; refresh tokens are
// single-use and a reuse revokes the whole session, so every refresh runs under a Web Lock and
// first re-reads what another tab may have stored meanwhile.

const KEY = "chatd.session";
const REFRESH_AHEAD_MS = 60000; // refresh when the access token has less left, or a third of a short lifetime

export class ApiError extends Error {
  constructor(status, code, message, retryAfterMs) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

function load() {
  try {
    return JSON.parse(localStorage.getItem(KEY) ?? "null");
  } catch {
    return null;
  }
}

async function withLock(fn) {
  // navigator.locks exists in secure contexts (https, localhost); elsewhere one tab is assumed.
  return navigator.locks ? navigator.locks.request("chatd-refresh", fn) : fn();
}

export class Api {
  constructor(onSignedOut) {
    this.state = load(); // {access, refresh, exp, user}
    this.onSignedOut = onSignedOut;
  }

  get user() {
    return this.state?.user ?? null;
  }

  save(body) {
    this.state = {
      access: body.access_token,
      refresh: body.refresh_token,
      exp: Date.now() + body.expires_in * 1000,
      ahead: Math.min(REFRESH_AHEAD_MS, (body.expires_in * 1000) / 3),
      user: body.user ?? this.state?.user,
    };
    localStorage.setItem(KEY, JSON.stringify(this.state));
  }

  async signIn(email, password, name) {
    const body = name ? { email, password, name } : { email, password };
    this.save(await this.raw("POST", name ? "/auth/register" : "/auth/login", body));
    return this.user;
  }

  async signOut() {
    if (this.state) {
      try {
        await this.raw("POST", "/auth/logout", null, null, this.state.access);
      } catch {
        // the session ends locally all the same
      }
    }
    this.clear();
  }

  clear() {
    this.state = null;
    localStorage.removeItem(KEY);
    this.onSignedOut?.();
  }

  async refresh() {
    const seen = this.state?.refresh;
    return withLock(async () => {
      const stored = load();
      if (stored && stored.refresh !== seen && stored.exp - Date.now() > (stored.ahead ?? REFRESH_AHEAD_MS)) {
        this.state = stored; // another tab refreshed while we waited
        return stored.access;
      }
      if (!stored) {
        this.clear();
        throw new ApiError(401, "unauthorized", "signed out");
      }
      try {
        this.save(await this.raw("POST", "/auth/refresh", { refresh_token: stored.refresh }));
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) this.clear();
        throw err;
      }
      return this.state.access;
    });
  }

  async token() {
    if (!this.state) throw new ApiError(401, "unauthorized", "signed out");
    if (this.state.exp - Date.now() < (this.state.ahead ?? REFRESH_AHEAD_MS)) return this.refresh();
    return this.state.access;
  }

  async call(method, path, body = null, query = null) {
    try {
      return await this.raw(method, path, body, query, await this.token());
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
    }
    return this.raw(method, path, body, query, await this.refresh()); // it may have just expired
  }

  // Multipart upload or binary download with the same token handling as call(): returns JSON or a Blob.
  async transfer(method, path, { form = null, as = "json" } = {}) {
    const go = async (token) => {
      const resp = await fetch(new URL(`/api/v1${path}`, location.origin), {
        method,
        headers: { Authorization: `Bearer ${token}` },
        body: form ?? undefined,
      });
      if (!resp.ok) {
        let err = {};
        try {
          err = (await resp.json()).error ?? {};
        } catch {
          // not JSON
        }
        throw new ApiError(resp.status, err.code ?? "http", err.message ?? resp.statusText, err.retry_after_ms);
      }
      return as === "blob" ? resp.blob() : resp.json();
    };
    try {
      return await go(await this.token());
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401 || form) throw err; // an upload body is not resent
    }
    return go(await this.refresh());
  }

  async raw(method, path, body = null, query = null, token = null) {
    const url = new URL(`/api/v1${path}`, location.origin);
    for (const [k, v] of Object.entries(query ?? {})) url.searchParams.set(k, String(v));
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== null) headers["Content-Type"] = "application/json";
    const resp = await fetch(url, { method, headers, body: body === null ? undefined : JSON.stringify(body) });
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      // not JSON (a proxy's error page): reported by status below
    }
    if (!resp.ok) {
      const err = data?.error ?? {};
      throw new ApiError(resp.status, err.code ?? "http", err.message ?? resp.statusText, err.retry_after_ms);
    }
    return data;
  }
}
