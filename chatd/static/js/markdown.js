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
