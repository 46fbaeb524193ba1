// weightsmith ui: the chat page. Sends the conversation to POST /api/chat and shows the reply as
// it streams (server-sent events). Every text from the model or the user is written with
// textContent, never as HTML: a reply holding "<script>" shows those characters.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("chat-form"), model = $("model"), prompt = $("prompt"), status = $("chat-status");
  const send = $("send"), stop = $("stop"), reset = $("reset"), conversation = $("conversation");
  let messages = [];
  let controller = null;

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    div.append(label, body);
    conversation.append(div);
    return body;
  }

  function say(text) { status.textContent = text; }

  function busy(on) {
    send.disabled = on; model.disabled = on; reset.disabled = on; stop.disabled = !on;
  }

  function clear() {
    messages = [];
    conversation.replaceChildren();
    say("New chat.");
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || response.statusText;
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  function handle(event, reply) {
    if (event.status === "loading") say("Loading " + event.model + "…");
    else if (event.status === "loaded") say("Loaded in " + event.seconds + " s; answering…");
    else if (event.text !== undefined) { reply.textContent += event.text; }
    else if (event.done) {
      say("Done: " + event.tokens + " tokens in " + event.seconds + " s (" + event.finish_reason + ").");
      return "done";
    } else if (event.error !== undefined) { say("Error: " + event.error); return "error"; }
    return null;
  }

  async function ask() {
    const text = prompt.value;
    if (!text.trim() || controller) return;
    const system = $("system").value.trim();
    messages.push({ role: "user", content: text });
    bubble("user", text);
    prompt.value = "";
    const reply = bubble("assistant", "");
    const body = { model: model.value, messages: (system ? [{ role: "system", content: system }] : []).concat(messages) };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const temperature = $("temperature").value;
    if (temperature !== "") body.temperature = parseFloat(temperature);
    controller = new AbortController();
    busy(true);
    say("Sending…");
    let outcome = null;
    try {
      const response = await fetch("/api/chat", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: controller.signal, credentials: "same-origin",
      });
      if (!response.ok) { say("Error: " + (await errorOf(response))); outcome = "error"; return; }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      while (outcome === null) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while (outcome === null && (cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (line.startsWith("data: ")) outcome = handle(JSON.parse(line.slice(6)), reply);
        }
      }
      if (outcome === null) say("The reply stopped early.");
    } catch (e) {
      say(e.name === "AbortError" ? "Stopped." : "Error: " + e.message);
    } finally {
      if (outcome === "error" && reply.textContent === "") reply.parentElement.remove();
      if (reply.textContent !== "") messages.push({ role: "assistant", content: reply.textContent });
      else if (outcome !== "done") messages.pop();
      controller = null;
      busy(false);
      prompt.focus();
    }
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
  reset.addEventListener("click", clear);
  model.addEventListener("change", clear);
  busy(false);
})();
