// The dashboard: sign in (or register), pick a project, then a REST snapshot of it kept current by
// Socket.IO events. No reload is ever needed; panels re-render at most once per animation frame.

import "./style.css";
import { ApiError, all, api, currentToken, optional, setToken } from "./api";
import { byId, fill, h } from "./dom";
import { Live, type LiveState } from "./live";
import { type Board, apply, emptyBoard, fromRequest } from "./state";
import { isAdmin, renderApprovals, renderBudgets, renderFeed, renderInsights, renderPayments, renderWallet } from "./panels";
import { SpendChart } from "./chart";
import { Chat } from "./chat";
import { renderAdmin } from "./admin";

let board: Board | null = null;
let live: Live | null = null;
let projects: any[] = [];
let loadId = 0;
const dirty = new Set<string>();
let frame = 0;
let chartTimer = 0;

const chart = new SpendChart(byId("chart"));
const chat = new Chat(byId("chat-log"), byId<HTMLInputElement>("chat-input"), byId<HTMLButtonElement>("chat-send"));

function setLive(state: LiveState, detail?: string): void {
  const el = byId("live-status");
  el.textContent = state;
  el.className = `live ${state.replace(" ", "-")}`;
  el.title = detail ?? "";
  if (state === "signed out") signOut("Your session ended: sign in again.");
}

function schedule(...panels: string[]): void {
  for (const p of panels) dirty.add(p);
  if (!frame) frame = requestAnimationFrame(draw);
}

function draw(): void {
  frame = 0;
  const b = board;
  if (!b) return;
  const panels = [...dirty];
  dirty.clear();
  for (const p of panels) {
    switch (p) {
      case "wallet": renderWallet(byId("wallet"), b); break;
      case "budgets": renderBudgets(byId("budgets"), b, deleteBudget); break;
      case "feed": renderFeed(byId("request-feed"), b); break;
      case "approvals": renderApprovals(byId("approvals"), b, resolve); break;
      case "payments": renderPayments(byId("payments"), b); break;
      case "insights": renderInsights(byId("insights"), b, actOnInsight); break;
      case "chart":
        if (!chartTimer) chartTimer = window.setTimeout(() => { chartTimer = 0; if (board) chart.render(board); }, 500);
        break;
      case "admin": {
        // An event does not redraw the forms under someone's fingers; the panel's own actions do.
        if (isAdmin(b) && !byId("admin").contains(document.activeElement)) drawAdmin(b);
        break;
      }
      case "policy":
        if (isAdmin(b)) void reloadPolicy(b);
        break;
    }
  }
}

function drawAdmin(b: Board): void {
  renderAdmin(byId("admin"), b, () => {
    drawAdmin(b);
    schedule("budgets", "feed");
  });
}

function flash(text: string, bad = true): void {
  const el = byId("notice");
  el.textContent = text;
  el.className = bad ? "notice bad" : "notice";
  el.hidden = false;
  window.setTimeout(() => { if (el.textContent === text) el.hidden = true; }, 6000);
}

async function failed(exc: unknown): Promise<void> {
  if (exc instanceof ApiError && exc.status === 401) return signOut("Your session ended: sign in again.");
  flash(exc instanceof ApiError ? `${exc.code}: ${exc.message}` : String(exc));
}

async function resolve(requestId: string, how: "approve" | "reject"): Promise<void> {
  try {
    await api("POST", `/api/v1/requests/${requestId}/${how}`, {});
    board?.approvals.delete(requestId);
    schedule("approvals");
  } catch (exc) {
    await failed(exc);
  }
}

async function actOnInsight(id: string, how: "acknowledge" | "dismiss"): Promise<void> {
  if (!board) return;
  try {
    await api("POST", `/api/v1/projects/${board.projectId}/insights/${id}/${how}`, {});
    board.insights?.delete(id);
    schedule("insights", "wallet", "budgets");
  } catch (exc) {
    await failed(exc);
  }
}

async function deleteBudget(id: string): Promise<void> {
  if (!board) return;
  try {
    await api("DELETE", `/api/v1/projects/${board.projectId}/budgets/${id}`);
    board.budgets.delete(id);
    schedule("budgets");
  } catch (exc) {
    await failed(exc);
  }
}

async function reloadPolicy(b: Board): Promise<void> {
  try {
    b.policy = await api("GET", `/api/v1/projects/${b.projectId}/policy`);
    schedule("admin");
  } catch (exc) {
    await failed(exc);
  }
}

async function fundOnDevnet(): Promise<void> {
  const b = board;
  if (!b) return;
  try {
    // the devnet starts on the first payments call: the address comes from there
    const info = await api("GET", `/api/v1/projects/${b.projectId}/deposit-address`);
    if (b.wallet) b.wallet.deposit_address = info.deposit_address;
    const tx = await api("POST", "/api/v1/devnet/transfer", { to_address: info.deposit_address, amount_micros: 10_000_000 });
    await api("POST", `/api/v1/projects/${b.projectId}/deposits`, { tx_hash: tx.tx_hash });
    flash("10 test USDC deposited on the devnet.", false);
  } catch (exc) {
    await failed(exc);
  }
}

async function openProject(projectId: string): Promise<void> {
  const id = ++loadId;
  live?.close();
  live = null;
  const project = projects.find((p) => p.id === projectId);
  const b = emptyBoard(projectId, project?.role ?? "viewer");
  board = b;
  byId("board").hidden = false;
  byId("admin-card").hidden = !isAdmin(b);
  byId("fund").hidden = !isAdmin(b);
  schedule("wallet", "budgets", "feed", "approvals", "payments", "insights", "chart");
  const base = `/api/v1/projects/${projectId}`;
  try {
    // The log's head first: the subscription replays everything after it, so an event committed
    // while the snapshot loads is applied on top of it, never lost.
    // Without it (a role that may not read the log), since 0 replays the whole log: slower, as correct.
    const head = await api("GET", `${base}/audit?limit=1`).catch(() => ({ items: [] }));
    const since = head.items[0]?.seq ?? 0;
    const [wallet, budgets, requests, held, payments, deposits, insights, agents, keys, policy] = await Promise.all([
      api("GET", `${base}/wallet`),
      all(`${base}/budgets`),
      api("GET", `${base}/requests?limit=100`),
      all(`${base}/requests?status=pending_approval`),
      optional(api("GET", `${base}/payments?limit=50`), { items: [] }),
      optional(api("GET", `${base}/deposits?limit=50`), { items: [] }),
      optional(all(`${base}/insights`), null),
      all(`${base}/agents`),
      isAdmin(b) ? all(`${base}/keys`) : Promise.resolve([]),
      isAdmin(b) ? api("GET", `${base}/policy`) : Promise.resolve(null),
    ]);
    if (id !== loadId) return;
    b.wallet = wallet;
    for (const x of budgets) if (x.active !== false) b.budgets.set(x.id, x);
    for (const r of requests.items) b.requests.set(r.id, fromRequest(r));
    for (const r of held) {
      b.approvals.set(r.id, { request_id: r.id, model: r.model, agent_id: r.agent_id, created_at: r.created_at,
                              estimated_cost_micros: r.reserved_micros || r.estimated_cost_micros,
                              risk_score: r.decision?.risk_score, reasons: r.decision?.reasons ?? [],
                              expires_at: r.approval_expires_at });
      b.requests.set(r.id, fromRequest(r));
    }
    for (const p of payments.items) b.payments.set(p.id, p);
    for (const d of deposits.items) b.deposits.set(d.id, d);
    b.insights = insights ? new Map(insights.map((i: any) => [i.id, i])) : null;
    for (const a of agents) b.agents.set(a.id, a);
    for (const k of keys) b.keys.set(k.id, k);
    b.policy = policy;
    schedule("wallet", "budgets", "feed", "approvals", "payments", "insights", "chart", "admin");
    const token = currentTokenOrThrow();
    live = new Live(token, projectId, since, (_ns, event) => {
      if (board !== b) return;
      schedule(...apply(b, event));
    }, setLive, (type, data) => chat.onEvent(type, data));
    chat.reset(projectId, live.chat);
  } catch (exc) {
    if (id === loadId) await failed(exc);
  }
}

function currentTokenOrThrow(): string {
  const token = currentToken();
  if (!token) throw new Error("not signed in");
  return token;
}

async function signedIn(token: string): Promise<void> {
  setToken(token);
  const me = await api("GET", "/api/v1/me");
  projects = await all("/api/v1/projects");
  byId("who").textContent = me.email ?? me.name ?? "";
  byId("login").hidden = true;
  byId("signout").hidden = false;
  const select = byId<HTMLSelectElement>("project-select");
  fill(select, projects.map((p) => h("option", { value: p.id }, `${p.name}${p.role ? ` (${p.role})` : ""}`)));
  select.hidden = false;
  if (projects.length) await openProject(projects[0].id);
  else flash("You are not a member of any project yet.");
}

function signOut(message?: string): void {
  live?.close();
  live = null;
  board = null;
  setToken(null);
  byId("board").hidden = true;
  byId("login").hidden = false;
  byId("signout").hidden = true;
  byId("project-select").hidden = true;
  byId("who").textContent = "";
  byId("live-status").textContent = "offline";
  byId("live-status").className = "live offline";
  byId("login-error").textContent = message ?? "";
}

function boot(): void {
  const form = byId<HTMLFormElement>("login-form");
  const registering = () => form.dataset.mode === "register";
  byId("login-toggle").addEventListener("click", () => {
    form.dataset.mode = registering() ? "login" : "register";
    byId("login-name-row").hidden = !registering();
    byId("login-submit").textContent = registering() ? "Create account" : "Sign in";
    byId("login-toggle").textContent = registering() ? "I have an account" : "Create an account";
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const email = byId<HTMLInputElement>("login-email").value.trim();
    const password = byId<HTMLInputElement>("login-password").value;
    const name = byId<HTMLInputElement>("login-name").value.trim() || email.split("@")[0];
    byId("login-error").textContent = "";
    try {
      const answer = registering()
        ? await api("POST", "/api/v1/auth/register", { email, password, name })
        : await api("POST", "/api/v1/auth/token", { email, password });
      byId<HTMLInputElement>("login-password").value = "";
      await signedIn(answer.access_token);
    } catch (exc) {
      byId("login-error").textContent = exc instanceof ApiError ? exc.message : String(exc);
    }
  });
  byId("signout").addEventListener("click", () => signOut());
  byId("project-select").addEventListener("change", (e) => void openProject((e.target as HTMLSelectElement).value));
  byId("chart-by").addEventListener("change", (e) => {
    chart.by = (e.target as HTMLSelectElement).value as "model" | "agent";
    if (board) chart.render(board);
  });
  byId("fund").addEventListener("click", () => void fundOnDevnet());
  // relative times ("12s ago") and the runway age: refresh them now and then
  window.setInterval(() => schedule("feed", "wallet", "payments"), 15000);
}

boot();
