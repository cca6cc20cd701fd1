// Talking to the FlashTune API: the key (sessionStorage), JSON calls, uploads, downloads and the job event stream.
// The key goes in "Authorization: Bearer <key>", as every API route but /healthz and /readyz expects when
// FLASHTUNE_API_KEY is set. EventSource cannot send that header, so the event stream is read with fetch().

const KEY_STORAGE = "flashtune.apiKey";

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, type, message, details) {
    super(message);
    this.status = status;
    this.type = type;
    this.details = details;
  }
}

const listeners = { unauthorized: [], open: [] };

/** Call ``fn(error)`` whenever the API answers 401 (no key, or a wrong one). */
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

/** Call ``fn()`` when a call sent without a key succeeds: the server needs none (FLASHTUNE_API_KEY unset). */
export function onOpenServer(fn) {
  listeners.open.push(fn);
}

function answered(response, sentKey) {
  if (response.ok && !sentKey) listeners.open.forEach((fn) => fn());
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const error = body && body.error ? body.error : {};
  const err = new ApiError(response.status, error.type || "http_error",
    error.message || `${response.status} ${response.statusText}`, error.details);
  if (response.status === 401) listeners.unauthorized.forEach((fn) => fn(err));
  return err;
}

/** A JSON request; resolves to the parsed body, rejects with ApiError (the API's one error shape). */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers({ Accept: "application/json" }), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  answered(response, "Authorization" in init.headers);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** POST multipart form data (dataset uploads). */
export async function upload(path, formData) {
  const response = await fetch(path, { method: "POST", headers: headers({ Accept: "application/json" }), body: formData });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** Fetch a file with the key and hand it to the browser as a download (a plain link cannot send the header). */
export async function download(path, filename) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Follow ``GET /jobs/{id}/events?stream=true`` (Server-Sent Events) with fetch, reconnecting with Last-Event-ID.
 * ``onEvent(event)`` gets each job event; ``onEnd(status)`` the final status. Returns a function that stops it.
 */
export function followEvents(jobId, { onEvent, onEnd, onError }) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;

  async function connect() {
    const extra = { Accept: "text/event-stream" };
    if (lastId !== null) extra["Last-Event-ID"] = String(lastId);
    const response = await fetch(`/jobs/${jobId}/events?stream=true`, { headers: headers(extra), signal: controller.signal });
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false; // closed without "end": reconnect
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const message = { event: "message", data: "", id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data += (message.data ? "\n" : "") + val;
          else if (field === "event") message.event = val;
          else if (field === "id") message.id = val;
        }
        if (!message.data) continue;
        const data = JSON.parse(message.data);
        if (message.event === "end") {
          if (onEnd) onEnd(data.status);
          return true;
        }
        if (message.id !== null) lastId = message.id;
        onEvent(data);
      }
    }
  }

  (async () => {
    let delay = 1000;
    while (!stopped) {
      try {
        if (await connect()) return;
        delay = 1000;
      } catch (err) {
        if (stopped || err.name === "AbortError") return;
        if (onError) onError(err);
        if (err instanceof ApiError && err.status < 500) return; // 401, 404: reconnecting will not help
        delay = Math.min(delay * 2, 15_000);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  })();

  return () => {
    stopped = true;
    controller.abort();
  };
}
