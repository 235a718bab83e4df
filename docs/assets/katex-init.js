// Typeset the math that pymdownx.arithmatex (generic mode) wraps in `.arithmatex` elements:
// `\( … \)` inline, `\[ … \]` display. KaTeX is the copy in docs/assets/katex, so pages need no
// network. Material's `document$` fires on every page load, instant navigation included.
function jbackpropRenderMath(root) {
  root.querySelectorAll(".arithmatex").forEach(function (el) {
    var tex = el.textContent.trim();
    var display = tex.startsWith("\\[");
    tex = tex.replace(/^\\[([]/, "").replace(/\\[)\]]$/, "");
    katex.render(tex, el, { displayMode: display, throwOnError: false, strict: "ignore" });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(function (page) { jbackpropRenderMath(page.body); });
} else {
  document.addEventListener("DOMContentLoaded", function () { jbackpropRenderMath(document.body); });
}
