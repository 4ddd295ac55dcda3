// Assistant answers as Markdown: marked renders, DOMPurify sanitizes. The page's CSP requires
// Trusted Types for every HTML sink, and DOMPurify's own "dompurify" policy is the only one allowed,
// so no other code path can write HTML.

import DOMPurify from "../vendor/purify.es.mjs";
import { marked } from "../vendor/marked.esm.js";

marked.use({ gfm: true, breaks: true, async: false });

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
