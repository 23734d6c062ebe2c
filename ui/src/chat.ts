// The assistant: a question goes over /chat (`message`, acknowledged with the message id), the
// answer streams in as chat.delta events and ends with chat.message. Without the socket answering,
// the REST fallback (POST /api/v1/chatbot/chat) answers in one response.

import type { Socket } from "socket.io-client";
import { ApiError, api } from "./api";
import { h } from "./dom";

export class Chat {
  private conversationId: string | null = null;
  private readonly bubbles = new Map<string, HTMLElement>();
  socket: Socket | null = null;
  projectId: string | null = null;

  constructor(private readonly log: HTMLElement, private readonly input: HTMLInputElement,
              private readonly send: HTMLButtonElement) {
    send.addEventListener("click", () => void this.ask());
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") void this.ask();
    });
  }

  reset(projectId: string, socket: Socket): void {
    this.projectId = projectId;
    this.socket = socket;
    this.conversationId = null;
    this.bubbles.clear();
    this.log.replaceChildren();
  }

  onEvent(type: string, data: any): void {
    if (!data?.message_id) return;
    const bubble = this.bubble(data.message_id);
    if (type === "chat.delta") {
      bubble.textContent = (bubble.textContent ?? "") + String(data.delta ?? "");
      bubble.classList.add("streaming");
    } else if (type === "chat.message") {
      bubble.textContent = String(data.text ?? bubble.textContent ?? "");
      bubble.classList.remove("streaming");
      bubble.setAttribute("data-done", "");
    }
    if (data.conversation_id) this.conversationId = data.conversation_id;
    this.log.scrollTop = this.log.scrollHeight;
  }

  private bubble(messageId: string): HTMLElement {
    let bubble = this.bubbles.get(messageId);
    if (!bubble) {
      bubble = h("div", { class: "msg assistant", "data-message-id": messageId });
      this.bubbles.set(messageId, bubble);
      this.log.appendChild(bubble);
    }
    return bubble;
  }

  private async ask(): Promise<void> {
    const text = this.input.value.trim();
    if (!text || !this.projectId) return;
    this.input.value = "";
    this.log.appendChild(h("div", { class: "msg user" }, text));
    const body: Record<string, string> = { text, project_id: this.projectId };
    if (this.conversationId) body.conversation_id = this.conversationId;
    if (this.socket?.connected) {
      try {
        const ack: any = await this.socket.timeout(10000).emitWithAck("message", body);
        if (ack?.ok) {
          this.conversationId = ack.conversation_id ?? this.conversationId;
          this.bubble(ack.message_id);
          return;
        }
        if (ack?.error) return this.note(ack.error.message ?? "the assistant refused the question");
      } catch {
        // no answer over the socket: try REST
      }
    }
    try {
      const answer: any = await api("POST", "/api/v1/chatbot/chat", {
        message: text, project_id: this.projectId, ...(this.conversationId ? { conversation_id: this.conversationId } : {}),
      });
      this.conversationId = answer.conversation_id ?? this.conversationId;
      this.onEvent("chat.message", { message_id: answer.message_id, text: answer.response });
    } catch (exc) {
      this.note(exc instanceof ApiError && exc.status === 404
        ? "The assistant is not available on this server." : `The assistant failed: ${(exc as Error).message}`);
    }
  }

  private note(text: string): void {
    this.log.appendChild(h("div", { class: "msg note" }, text));
  }
}
