// In the API reference, show the source of the private functions (the custom_vjp cores, their
// forward rules and hand-written backwards) and of the tests open: that code is what the
// derivation pages link to. Public functions keep it folded under their docstring.
function jbackpropOpenSource(root) {
  root.querySelectorAll(".doc-heading[id]").forEach(function (heading) {
    var id = heading.id;
    if (id.indexOf("._") < 0 && id.indexOf("test_") !== 0) return;
    var object = heading.closest(".doc-object");
    var source = object && object.querySelector("details.mkdocstrings-source");
    if (source) source.open = true;
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(function (page) { jbackpropOpenSource(page.body); });
} else {
  document.addEventListener("DOMContentLoaded", function () { jbackpropOpenSource(document.body); });
}
