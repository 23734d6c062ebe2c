// Money is integer micro-USDC everywhere; it is shown exactly (AI calls cost fractions of a cent).

export function usdc(micros: number | null | undefined): string {
  if (micros === null || micros === undefined) return "—";
  const sign = micros < 0 ? "-" : "";
  const abs = Math.abs(Math.trunc(micros));
  const whole = Math.floor(abs / 1_000_000);
  let frac = String(abs % 1_000_000).padStart(6, "0").replace(/0+$/, "");
  if (frac.length < 2) frac = frac.padEnd(2, "0");
  return `${sign}$${whole.toLocaleString("en-US")}.${frac}`;
}

export function ago(iso: string | null | undefined, now = Date.now()): string {
  if (!iso) return "";
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

export function duration(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)} min`;
  if (ms < 172_800_000) return `${(ms / 3_600_000).toFixed(1)} h`;
  if (ms < 365 * 86_400_000) return `${(ms / 86_400_000).toFixed(1)} days`;
  return "over a year";
}

export function short(hash: string | null | undefined, keep = 10): string {
  if (!hash) return "—";
  return hash.length > keep * 2 ? `${hash.slice(0, keep)}…${hash.slice(-6)}` : hash;
}
