// Assistant answers as Markdown: marked renders, DOMPurify sanitizes. The page's CSP requires
// Trusted Types for every HTML sink, and DOMPurify's own "dompurify" policy is the only one allowed,
// so no other code path can write HTML. Raw HTML inside the Markdown is shown as text, not markup:
// answers quote their prompts, and a prompt's tags are the sender's words, not the page's.

import DOMPurify from "../vendor/purify.es.mjs";
import { marked } from "../vendor/marked.esm.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

marked.use({ gfm: true, breaks: true, async: false, renderer: { html: (token) => escapeHtml(token.text) } });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const OPTIONS = {
  RETURN_TRUSTED_TYPE: true,
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style", "class", "id"],
};

export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), OPTIONS);
}

// A user's message: its text as text, its web addresses as links. Built from DOM nodes (no HTML is parsed),
// the links as the sanitizer leaves the assistant's: http(s) only, opened apart (target, rel).
const URL_IN_TEXT = /\bhttps?:\/\/[^\s<>"'`]+/gi;
const CLOSERS = { ")": "(", "]": "[", "}": "{" };
const count = (text, c) => text.split(c).length - 1;

function trimAddress(url) {
  // Sentence punctuation after an address is not part of it; a closing bracket is unless the address opened it.
  for (;;) {
    const c = url.at(-1);
    const open = CLOSERS[c];
    if (".,;:!?'\"".includes(c) || (open && count(url, open) < count(url, c))) url = url.slice(0, -1);
    else return url;
  }
}

export function renderLinkified(element, text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(URL_IN_TEXT)) {
    const url = trimAddress(match[0]);
    let href;
    try {
      href = new URL(url);
    } catch {
      continue;
    }
    if (href.protocol !== "http:" && href.protocol !== "https:") continue;
    const link = document.createElement("a");
    link.href = href.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.textContent = url;
    parts.push(text.slice(last, match.index), link);
    last = match.index + url.length;
  }
  parts.push(text.slice(last));
  element.replaceChildren(...parts.filter((p) => p !== ""));
}
