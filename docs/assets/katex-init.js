// Typeset the math that pymdownx.arithmatex (generic mode) wraps in `.arithmatex` elements:
// `\( … \)` inline, `\[ … \]` display; and the `\( … \)` left as text in the navigation (a
// heading's math appears there as plain text). KaTeX is the copy in docs/assets/katex, so pages
// need no network. Material's `document$` fires on every page load, instant navigation included.
var jbackpropKatex = { throwOnError: false, strict: "ignore" };

function jbackpropRenderMath(root) {
  root.querySelectorAll(".arithmatex").forEach(function (el) {
    var tex = el.textContent.trim();
    var display = tex.startsWith("\\[");
    tex = tex.replace(/^\\[([]/, "").replace(/\\[)\]]$/, "");
    katex.render(tex, el, Object.assign({ displayMode: display }, jbackpropKatex));
  });
  root.querySelectorAll(".md-nav__link, .md-ellipsis").forEach(function (el) {
    if (el.children.length || el.textContent.indexOf("\\(") < 0) return;
    var parts = el.textContent.split(/\\\(([\s\S]+?)\\\)/);
    el.innerHTML = parts.map(function (part, i) {
      if (i % 2) return katex.renderToString(part, jbackpropKatex);
      var span = document.createElement("span");
      span.textContent = part;
      return span.innerHTML;
    }).join("");
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(function (page) { jbackpropRenderMath(page.body); });
} else {
  document.addEventListener("DOMContentLoaded", function () { jbackpropRenderMath(document.body); });
}
