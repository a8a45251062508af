/**
 * Answers that carry token usage, in the shapes of the Azure OpenAI and
 * OpenAI API references (field order as the services send them), for the
 * fake's canned answers.
 */

/** Azure's chat completion: choices first, keys sorted, content filter results, usage with both details objects. */
export function chatCompletion(model = "gpt-4o-2024-08-06"): string {
  return JSON.stringify({
    choices: [{
      content_filter_results: { hate: { filtered: false, severity: "safe" }, self_harm: { filtered: false, severity: "safe" }, sexual: { filtered: false, severity: "safe" }, violence: { filtered: false, severity: "safe" } },
      finish_reason: "stop",
      index: 0,
      logprobs: null,
      // Text that looks like usage is no usage: it is a string, escaped.
      message: { content: 'The JSON you asked for: {"usage": {"prompt_tokens": 1000}, "model": "fake"}', refusal: null, role: "assistant" },
    }],
    created: 1_790_000_000,
    id: "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    model,
    object: "chat.completion",
    prompt_filter_results: [{ prompt_index: 0, content_filter_results: { hate: { filtered: false, severity: "safe" } } }],
    system_fingerprint: "fp_b705f0c291",
    usage: {
      completion_tokens: 42,
      completion_tokens_details: { accepted_prediction_tokens: 0, audio_tokens: 0, reasoning_tokens: 10, rejected_prediction_tokens: 0 },
      prompt_tokens: 120,
      prompt_tokens_details: { audio_tokens: 0, cached_tokens: 64 },
      total_tokens: 162,
    },
  });
}

export const CHAT_TOKENS = { input: 120, output: 42, cached_input: 64, reasoning: 10 };

export function completion(): string {
  return JSON.stringify({
    id: "cmpl-7QmVI15qgYVllxK0FtxVGG6ywfzaq",
    object: "text_completion",
    created: 1_790_000_000,
    model: "gpt-35-turbo-instruct",
    choices: [{ text: "\n\nThis is indeed a test", index: 0, logprobs: null, finish_reason: "length" }],
    usage: { prompt_tokens: 5, completion_tokens: 7, total_tokens: 12 },
  });
}

export const COMPLETION_TOKENS = { input: 5, output: 7, cached_input: 0, reasoning: 0 };

/** An embeddings answer: `vectors` vectors of 1,536 floats, the model and usage after the data. */
export function embeddings(vectors = 1, promptTokens = 8): string {
  const vector = Array.from({ length: 1536 }, (_, index) => Number((Math.sin(index) / 10).toFixed(9)));
  return JSON.stringify({
    object: "list",
    data: Array.from({ length: vectors }, (_, index) => ({ object: "embedding", index, embedding: vector })),
    model: "text-embedding-3-small",
    usage: { prompt_tokens: promptTokens, total_tokens: promptTokens },
  });
}

export const EMBEDDINGS_TOKENS = { input: 8, output: 0, cached_input: 0, reasoning: 0 };

function responseObject(status: string, usage: object | null, output: object[], metadata: object = {}): Record<string, unknown> {
  return {
    id: "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    object: "response",
    created_at: 1_790_000_000,
    status,
    error: null,
    incomplete_details: null,
    instructions: null,
    max_output_tokens: null,
    model: "o4-mini-2025-04-16",
    output,
    parallel_tool_calls: true,
    previous_response_id: null,
    reasoning: { effort: "medium", summary: null },
    store: true,
    temperature: 1,
    text: { format: { type: "text" } },
    tool_choice: "auto",
    tools: [],
    top_p: 1,
    truncation: "disabled",
    usage,
    user: null,
    metadata,
  };
}

const RESPONSE_USAGE = { input_tokens: 36, input_tokens_details: { cached_tokens: 12 }, output_tokens: 87, output_tokens_details: { reasoning_tokens: 64 }, total_tokens: 123 };
export const RESPONSES_TOKENS = { input: 36, output: 87, cached_input: 12, reasoning: 64 };
const MESSAGE = { type: "message", id: "msg_67ccd2bf17f0819081ff3bb2cf6508e6", status: "completed", role: "assistant", content: [{ type: "output_text", text: "In a peaceful grove beneath a silver moon...", annotations: [] }] };

export function response(): string {
  return JSON.stringify(responseObject("completed", RESPONSE_USAGE, [{ type: "reasoning", id: "rs_1", summary: [] }, MESSAGE]));
}

/** What a caller could make an answer echo: a usage-shaped object with more tokens than any real one here. */
export const USAGE_SHAPED = { input_tokens: 999, output_tokens: 999, total_tokens: 1998, prompt_tokens: 999, completion_tokens: 999 };

/**
 * A Responses answer echoing caller-controlled values that look like usage:
 * `metadata` (after the usage, where the API puts it, or first), a tool
 * call's arguments and a message's text holding usage as text, and an
 * output item holding a usage-shaped object.
 */
export function responseEchoing(metadata: object, first = false): string {
  const toolCall = { type: "function_call", id: "fc_1", call_id: "call_1", name: "report", arguments: JSON.stringify({ usage: USAGE_SHAPED, model: "fake" }), status: "completed" };
  const echoed = { ...MESSAGE, content: [{ type: "output_text", text: `"usage": ${JSON.stringify(USAGE_SHAPED)}`, annotations: [], usage: USAGE_SHAPED, model: "fake" }] };
  const { metadata: _, ...rest } = responseObject("completed", RESPONSE_USAGE, [toolCall, echoed]);
  return JSON.stringify(first ? { metadata, ...rest } : { ...rest, metadata });
}

/** The Responses API stream: typed events, usage null until `response.completed`. One string per event. */
export function responseEvents(): string[] {
  const event = (type: string, data: object) => `event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;
  return [
    event("response.created", { sequence_number: 0, response: responseObject("in_progress", null, []) }),
    event("response.in_progress", { sequence_number: 1, response: responseObject("in_progress", null, []) }),
    event("response.output_item.added", { sequence_number: 2, output_index: 0, item: { ...MESSAGE, status: "in_progress", content: [] } }),
    event("response.output_text.delta", { sequence_number: 3, item_id: MESSAGE.id, output_index: 0, content_index: 0, delta: "In a peaceful grove" }),
    event("response.output_text.delta", { sequence_number: 4, item_id: MESSAGE.id, output_index: 0, content_index: 0, delta: " beneath a silver moon..." }),
    event("response.output_item.done", { sequence_number: 5, output_index: 0, item: MESSAGE }),
    event("response.completed", { sequence_number: 6, response: responseObject("completed", RESPONSE_USAGE, [MESSAGE]) }),
  ];
}

/** A chat stream as Azure sends it with include_usage: a first chunk with an empty model, `"usage":null` in every chunk, the usage in a last chunk without choices. */
export function chatStreamEvents(): string[] {
  const chunk = (data: object) => `data: ${JSON.stringify(data)}\n\n`;
  const base = { created: 1_790_000_000, id: "chatcmpl-B9MHD", model: "gpt-4o-2024-08-06", object: "chat.completion.chunk", system_fingerprint: "fp_b705f0c291" };
  return [
    chunk({ choices: [], created: 0, id: "", model: "", object: "", prompt_filter_results: [{ prompt_index: 0, content_filter_results: {} }], usage: null }),
    chunk({ choices: [{ delta: { content: "", role: "assistant" }, finish_reason: null, index: 0 }], ...base, usage: null }),
    chunk({ choices: [{ delta: { content: "Hello" }, finish_reason: null, index: 0 }], ...base, usage: null }),
    chunk({ choices: [{ delta: {}, finish_reason: "stop", index: 0 }], ...base, usage: null }),
    chunk({ choices: [], ...base, usage: { completion_tokens: 42, completion_tokens_details: { reasoning_tokens: 10 }, prompt_tokens: 120, prompt_tokens_details: { cached_tokens: 64 }, total_tokens: 162 } }),
    "data: [DONE]\n\n",
  ];
}

/** A Realtime `response.done` server event with one response's usage (GA shape: `input_token_details`). */
export function realtimeResponseDone(input: number, output: number, cached: number): string {
  return JSON.stringify({
    type: "response.done",
    event_id: "event_AeqLA8iR6FK20L4XZs2P6",
    response: {
      object: "realtime.response",
      id: "resp_AeqL8XwMUOri9OhcQJIu9",
      status: "completed",
      status_details: null,
      output: [{ object: "realtime.item", id: "item_1", type: "message", status: "completed", role: "assistant", content: [{ type: "audio", transcript: "Hello!" }] }],
      usage: {
        total_tokens: input + output,
        input_tokens: input,
        output_tokens: output,
        input_token_details: { text_tokens: input - cached, audio_tokens: 0, cached_tokens: cached, cached_tokens_details: { text_tokens: cached, audio_tokens: 0 } },
        output_token_details: { text_tokens: output, audio_tokens: 0 },
      },
    },
  });
}

/** Cuts `text` into pieces of `size` characters: each becomes one TCP write of the fake. */
export function piecesOf(text: string, size: number): string[] {
  const pieces: string[] = [];
  for (let start = 0; start < text.length; start += size) pieces.push(text.slice(start, start + size));
  return pieces;
}
