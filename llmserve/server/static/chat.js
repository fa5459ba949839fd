// One streamed chat completion: POST /v1/chat/completions with `stream: true`, read the
// server-sent events as they arrive and hand each content delta to onDelta.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(body.error?.message || `HTTP ${response.status}`, response.status);
  } catch {
    return new ApiError(`HTTP ${response.status}`, response.status);
  }
}

export async function getJson(url, apiKey) {
  const r = await fetch(url, { headers: headers(apiKey), cache: "no-store" });
  if (!r.ok) throw await errorOf(r);
  return r.json();
}

// Returns {finishReason, usage}. Throws ApiError for an error status or an in-band error event,
// and the fetch's AbortError when `signal` aborts.
export async function streamChat({ body, apiKey, signal, onDelta }) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!r.ok) throw await errorOf(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finishReason = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return { finishReason, usage };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message, 500);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta?.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
    }
  }
  return { finishReason, usage };
}
