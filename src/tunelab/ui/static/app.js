// The tunelab UI's router: hash routes (#/runs, #/run/<id>, #/new, #/compare, #/playground/<id>) to the page
// modules. Each page's render(main, params) returns a cleanup function (close a live stream, stop a timer)
// that runs before the next page is drawn.

import { errorBox, h } from "./api.js";
import * as compare from "./compare.js";
import * as newRun from "./new.js";
import * as playground from "./playground.js";
import * as run from "./run.js";
import * as runs from "./runs.js";

const ROUTES = [
  [/^#\/runs\/?$/, runs, () => ({})],
  [/^#\/run\/(.+)$/, run, m => ({ id: decodeId(m[1]) })],
  [/^#\/new\/?(?:\?(.*))?$/, newRun, m => Object.fromEntries(new URLSearchParams(m[1] || ""))],
  [/^#\/compare\/?(?:\?(.*))?$/, compare, m => Object.fromEntries(new URLSearchParams(m[1] || ""))],
  [/^#\/playground\/(.+)$/, playground, m => ({ id: decodeId(m[1]) })],
];

const decodeId = text => text.split("/").map(decodeURIComponent).join("/");

let cleanup = null;

async function route() {
  const hash = location.hash || "#/runs";
  const match = ROUTES.map(([re, page, params]) => [re.exec(hash), page, params]).find(([m]) => m);
  if (cleanup) { try { cleanup(); } catch { /* a page's cleanup must not stop the next page */ } }
  cleanup = null;
  const main = document.getElementById("main");
  main.replaceChildren();
  const name = match ? match[1].NAV : null;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!match) {
    main.append(h("h1", {}, "Not found"), errorBox(`There is no page '${hash}'.`),
                h("p", {}, h("a", { href: "#/runs" }, "Back to the runs")));
    return;
  }
  const [m, page, params] = match;
  try {
    cleanup = await page.render(main, params(m)) || null;
  } catch (error) {
    main.append(errorBox(error));
  }
  // Move focus to the new page's heading so keyboard and screen-reader users land on it.
  const heading = main.querySelector("h1");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  if (!location.hash) history.replaceState(null, "", "#/runs");
  route();
});
