// The image page: switch the heatmap overlay and its opacity in place. Without JavaScript the form's
// "Show" button and the "show heatmap" links reload the page with ?result=<id>.
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  var overlay = document.getElementById("overlay");
  var form = document.getElementById("overlay-form");
  if (!overlay || !form) {
    return;
  }
  form.addEventListener("change", function (event) {
    var radio = event.target;
    if (radio.name !== "result") {
      return;
    }
    if (radio.value === "none") {
      overlay.hidden = true;
      overlay.removeAttribute("data-result");
    } else {
      overlay.src = radio.dataset.src;
      overlay.alt = radio.dataset.alt;
      overlay.dataset.result = radio.value;
      overlay.hidden = false;
    }
    var url = new URL(window.location.href);
    url.searchParams.set("result", radio.value);
    window.history.replaceState(null, "", url);
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
  });
  var opacity = document.getElementById("opacity");
  if (opacity) {
    opacity.addEventListener("input", function () {
      overlay.style.opacity = String(opacity.value / 100);
    });
  }
})();
