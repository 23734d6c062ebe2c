// Owners and admins manage the project from here: agents, keys (a new key is shown once), budgets
// and the policy (edited as JSON, validated by the server: its 422 names the field).

import { ApiError, api } from "./api";
import { fill, h } from "./dom";
import { ago, usdc } from "./format";
import type { Board } from "./state";
import { agentName } from "./panels";

type Refresh = () => void;

const POLICY_META = new Set(["project_id", "version", "created_at", "created_by"]);

// What the panel last said, and a new key's secret, survive the panel being redrawn (once per
// project: switching projects forgets them; a reload forgets the secret for good).
const said = { projectId: "", text: "", bad: false, secret: "" };

function errorText(exc: unknown): string {
  if (exc instanceof ApiError) return `${exc.code}: ${exc.message}`;
  return (exc as Error).message;
}

export function usdcToMicros(text: string): number | null {
  const m = /^\s*(\d+)(?:\.(\d{0,6}))?\s*$/.exec(text);
  if (!m) return null;
  return Number(m[1]) * 1_000_000 + Number((m[2] ?? "").padEnd(6, "0"));
}

function agentSelect(board: Board, name: string): HTMLSelectElement {
  return h("select", { name }, h("option", { value: "" }, "no agent (project-wide)"),
    [...board.agents.values()].map((a) => h("option", { value: a.id }, a.name))) as HTMLSelectElement;
}

export function renderAdmin(el: Element, board: Board, refresh: Refresh): void {
  const base = `/api/v1/projects/${board.projectId}`;
  if (said.projectId !== board.projectId) Object.assign(said, { projectId: board.projectId, text: "", bad: false, secret: "" });
  const status = h("p", { class: said.bad ? "small over" : "small", "data-testid": "admin-status", "aria-live": "polite" },
                   said.text);
  const say = (text: string, bad = false) => {
    Object.assign(said, { text, bad });
    status.textContent = text;
    status.className = bad ? "small over" : "small";
  };

  // agents
  const agentName_ = h("input", { name: "agent-name", placeholder: "agent name", required: true }) as HTMLInputElement;
  const agents = h("form", { class: "inline", onsubmit: async (e: Event) => {
    e.preventDefault();
    try {
      const agent = await api("POST", `${base}/agents`, { name: agentName_.value });
      board.agents.set(agent.id, agent);
      say(`Agent ${agent.name} created.`);
      refresh();
    } catch (exc) { say(errorText(exc), true); }
  } }, agentName_, h("button", { type: "submit" }, "Add agent"));

  // keys
  const keyName = h("input", { name: "key-name", placeholder: "key name", required: true }) as HTMLInputElement;
  const keyAgent = agentSelect(board, "key-agent");
  const secret = h("div", { class: "secret", "data-testid": "new-key" },
                   said.secret ? ["Copy this key now, it is shown once: ", h("code", {}, said.secret)] : null);
  const keys = h("form", { class: "inline", onsubmit: async (e: Event) => {
    e.preventDefault();
    try {
      const created = await api("POST", `${base}/keys`, { name: keyName.value, ...(keyAgent.value ? { agent_id: keyAgent.value } : {}) });
      board.keys.set(created.id, created);
      said.secret = created.key;
      say(`Key ${created.prefix}… created.`);
      refresh();
    } catch (exc) { say(errorText(exc), true); }
  } }, keyName, keyAgent, h("button", { type: "submit" }, "Create key"));
  const keyList = h("ul", { class: "plain" }, [...board.keys.values()].filter((k) => !k.revoked_at).map((k) =>
    h("li", {}, h("span", { class: "mono" }, `${k.prefix}…`), ` ${k.name}`,
      h("span", { class: "muted small" }, ` · ${agentName(board, k.agent_id)} · ${k.last_used_at ? `used ${ago(k.last_used_at)}` : "never used"}`),
      h("button", { class: "link", onclick: async () => {
        try { await api("DELETE", `${base}/keys/${k.id}`); k.revoked_at = new Date().toISOString(); say(`Key ${k.prefix} revoked.`); refresh(); }
        catch (exc) { say(errorText(exc), true); }
      } }, "revoke"))));

  // budgets
  const bName = h("input", { name: "budget-name", placeholder: "budget name", required: true }) as HTMLInputElement;
  const bLimit = h("input", { name: "budget-limit", placeholder: "limit, USDC", required: true, inputmode: "decimal" }) as HTMLInputElement;
  const bPeriod = h("select", { name: "budget-period" }, ["day", "week", "month", "total"].map((p) => h("option", { value: p }, p))) as HTMLSelectElement;
  const bAgent = agentSelect(board, "budget-agent");
  const budgets = h("form", { class: "inline", onsubmit: async (e: Event) => {
    e.preventDefault();
    const limit = usdcToMicros(bLimit.value);
    if (limit === null) return say("The limit is an amount of USDC, e.g. 2.5", true);
    try {
      const budget = await api("POST", `${base}/budgets`, { name: bName.value, limit_micros: limit, period: bPeriod.value,
                                                           ...(bAgent.value ? { agent_id: bAgent.value } : {}) });
      board.budgets.set(budget.id, budget);
      say(`Budget ${budget.name} created (${usdc(budget.limit_micros)} per ${budget.period}).`);
      refresh();
    } catch (exc) { say(errorText(exc), true); }
  } }, bName, bLimit, bPeriod, bAgent, h("button", { type: "submit" }, "Add budget"));

  // policy
  const rules = Object.fromEntries(Object.entries(board.policy ?? {}).filter(([k]) => !POLICY_META.has(k)));
  const text = h("textarea", { name: "policy", rows: 12, spellcheck: "false", class: "mono" }) as HTMLTextAreaElement;
  text.value = JSON.stringify(rules, null, 2);
  const policy = h("form", { onsubmit: async (e: Event) => {
    e.preventDefault();
    let body: unknown;
    try { body = JSON.parse(text.value); } catch { return say("The policy is not valid JSON.", true); }
    try {
      board.policy = await api("PUT", `${base}/policy`, body);
      say(`Policy saved: version ${board.policy.version}.`);
      refresh();
    } catch (exc) { say(errorText(exc), true); }
  } }, text, h("button", { type: "submit" }, "Save policy"),
    h("span", { class: "muted small" }, ` version ${board.policy?.version ?? 0}`));

  fill(el,
    h("h3", {}, "Agents"), h("p", { class: "small" }, [...board.agents.values()].map((a) => a.name).join(", ") || "none"), agents,
    h("h3", {}, "API keys"), keyList, keys, secret,
    h("h3", {}, "Budgets"), budgets,
    h("h3", {}, "Policy"), policy, status);
}
