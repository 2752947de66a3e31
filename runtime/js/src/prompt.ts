/**
 * Chat template rendering and SmolVLM image-token expansion, the same as the Python runtime's
 * `runtime/prompt.py` (and transformers' processor):
 *
 * 1. `renderChat` renders the manifest's Jinja chat template (@huggingface/jinja, with transformers'
 *    trim_blocks / lstrip_blocks); each image part becomes one `<image>` placeholder.
 * 2. `expandImageTokens` replaces the i-th placeholder with image i's layout:
 *
 *        split (rows x cols): <fake_token_around_image><row_1_col_1><image>*N...\n ... \n\n<fake_token_around_image><global-img><image>*N<fake_token_around_image>
 *        not split:           <fake_token_around_image><global-img><image>*N<fake_token_around_image>
 */

import { Template } from "@huggingface/jinja";

import { ConfigError, InputError } from "./errors.js";
import type { Tokens } from "./manifest.js";
import type { Grid } from "./preprocess.js";

export type TextPart = { readonly type: "text"; readonly text: string };
export type ImagePart<I> = { readonly type: "image"; readonly image: I };
export type Part<I> = TextPart | ImagePart<I>;
export interface Message<I> {
  readonly role: "system" | "user" | "assistant";
  readonly content: readonly Part<I>[];
}

/** A user turn with the images first, then the text (SmolVLM's usual layout). */
export function userMessage<I>(text: string, images: readonly I[] = []): Message<I> {
  return { role: "user", content: [...images.map((image) => ({ type: "image" as const, image })), { type: "text", text }] };
}

/** The token string for one image (transformers `get_image_prompt_string`). */
export function imagePromptString([rows, cols]: Grid, tokens: Tokens, imageSeqLen: number): string {
  const tile = tokens.image.repeat(imageSeqLen);
  const globalPart = `${tokens.fake_image}${tokens.global_image}${tile}${tokens.fake_image}`;
  if (rows === 0 && cols === 0) return globalPart;
  let lines = "";
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) lines += `${tokens.fake_image}<row_${r + 1}_col_${c + 1}>${tile}`;
    lines += "\n";
  }
  return `${lines}\n${globalPart}`;
}

/** Replace the i-th image placeholder of `text` with image i's expansion. */
export function expandImageTokens(text: string, grids: readonly Grid[], tokens: Tokens, imageSeqLen: number): string {
  const pieces = text.split(tokens.image);
  if (pieces.length - 1 !== grids.length) {
    throw new InputError(`the prompt has ${pieces.length - 1} ${tokens.image} placeholders but ${grids.length} images were given`, {
      hint: `give one image per ${tokens.image} placeholder (the chat template writes one per image part; literal ${tokens.image} in message text counts too)`,
    });
  }
  return pieces.reduce((out, piece, i) => (i === 0 ? piece : out + imagePromptString(grids[i - 1]!, tokens, imageSeqLen) + piece), "");
}

const templates = new Map<string, Template>();

function compile(chatTemplate: string): Template {
  let template = templates.get(chatTemplate);
  if (!template) {
    try {
      template = new Template(chatTemplate);
    } catch (err) {
      throw new ConfigError(`the chat template is not valid Jinja (${(err as Error).message})`, { hint: "fix chat_template in the bundle manifest" });
    }
    templates.set(chatTemplate, template);
  }
  return template;
}

/** Render `messages` as `processor.apply_chat_template(tokenize=False, add_generation_prompt=True)` does. */
export function renderChat<I>(messages: readonly Message<I>[], chatTemplate: string, tokens: Tokens): string {
  const hf = messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => (p.type === "text" ? { type: "text", text: p.text } : { type: "image" })),
  }));
  const vars: Record<string, unknown> = { messages: hf, tools: null, documents: null, add_generation_prompt: true };
  if (tokens.bos_token != null) vars["bos_token"] = tokens.bos_token;
  if (tokens.eos_token != null) vars["eos_token"] = tokens.eos_token;
  try {
    return compile(chatTemplate).render(vars);
  } catch (err) {
    throw new InputError(`the chat template rejected the conversation: ${(err as Error).message}`,
      { hint: "check the message roles and order the model expects" });
  }
}

/** Whether to tokenize with the tokenizer's special tokens: off when the prompt already starts with BOS. */
export function addSpecialTokensFor(prompt: string, bosToken: string | null | undefined): boolean {
  return !(bosToken && prompt.startsWith(bosToken));
}

/** The rendered chat with every image placeholder expanded (`grids` in the messages' image order). */
export function buildPrompt<I>(messages: readonly Message<I>[], grids: readonly Grid[], chatTemplate: string, tokens: Tokens, imageSeqLen: number): string {
  const nImages = messages.reduce((n, m) => n + m.content.filter((p) => p.type === "image").length, 0);
  if (nImages !== grids.length) {
    throw new InputError(`the messages hold ${nImages} images but ${grids.length} tile grids were given`, { hint: "preprocess every image of the request, in order" });
  }
  return expandImageTokens(renderChat(messages, chatTemplate, tokens), grids, tokens, imageSeqLen);
}
