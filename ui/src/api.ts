// REST client. The access token lives in this module's memory only: not in the URL, not in
// localStorage or sessionStorage, not in a cookie. Any script of this origin could read web
// storage, and a token there would outlive the tab; in memory it dies with the page, and the only
// script on the page is our own bundle (the CSP allows no other). The price is signing in again
// after a reload.

let token: string | null = null;

export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly details: unknown = {}) {
    super(message);
  }
}

export function setToken(value: string | null): void {
  token = value;
}

export function currentToken(): string | null {
  return token;
}

export async function api<T = any>(method: string, path: string, body?: unknown,
                                   headers: Record<string, string> = {}): Promise<T> {
  const init: RequestInit = { method, headers: { ...headers }, credentials: "omit", cache: "no-store" };
  const h = init.headers as Record<string, string>;
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    h["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code ?? "error", error.message ?? `HTTP ${response.status}`,
                       error.details ?? {});
  }
  return data as T;
}

/** Every item of a paginated list, up to `max`. */
export async function all<T = any>(path: string, max = 200): Promise<T[]> {
  const items: T[] = [];
  let cursor: string | null = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page: { items: T[]; next_cursor: string | null } = await api(
      "GET", `${path}${sep}limit=${Math.min(200, max)}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items.slice(0, max);
}

/** `fallback` when the route does not exist on this server (a feature not deployed yet). */
export async function optional<T>(call: Promise<T>, fallback: T): Promise<T> {
  try {
    return await call;
  } catch (exc) {
    if (exc instanceof ApiError && (exc.status === 404 || exc.status === 405)) return fallback;
    throw exc;
  }
}
