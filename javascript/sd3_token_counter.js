// sd-webui-sd3: CLIP and T5 token counts for SD3 in A1111's prompt counters.
//
// For SD3 the server's answer to A1111's own token-counter request carries a hidden
// <span class="sd3-tokens" data-...> next to A1111's "23/75" (see lib_sd3/webui/tokens.py).
// Here that becomes "23/75 · T5 31/77", in a warning style with a tooltip when T5 is truncated
// (or CLIP is over the early branch's limit), with the T5 part dimmed while T5 is switched off.
// No request of our own: we only watch A1111's counter elements change.
(function() {
    "use strict";

    var COUNTER_IDS = [
        "txt2img_token_counter", "txt2img_negative_token_counter",
        "img2img_token_counter", "img2img_negative_token_counter",
    ];
    var WARNING_CLASS = "sd3-token-warning";
    var T5_CLASS = "sd3-t5";
    var T5_OFF_CLASS = "sd3-t5-off";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    // What to show for one prompt, from the data attributes the server wrote.
    function describe(data) {
        var t5 = data.t5 === "" ? "?" : data.t5 + (data.t5Limit ? "/" + data.t5Limit : "");
        var lines = ["CLIP: " + data.clip + " tokens (" + data.clipTarget + " before the next chunk)"];
        if (data.t5 !== "") {
            lines.push("T5: " + data.t5 + " tokens" +
                (data.t5Limit ? "; this A1111 keeps " + data.t5Limit : "; no limit on this A1111"));
        }
        if (data.notes) {
            lines = lines.concat(data.notes.split("\n"));
        }
        var t5Off = data.t5State === "disabled"; // not encoded at all: nothing to warn about
        return {
            clip: data.clip + "/" + data.clipTarget,
            t5: " \u00b7 T5 " + t5,
            t5Off: t5Off,
            warn: data.clipState !== "ok" || (!t5Off && data.t5State !== "ok"),
            title: lines.join("\n"),
        };
    }

    function render(counter) {
        var info = counter.querySelector("span.sd3-tokens");
        if (!info) {
            // A1111's own counter (another model, or ours switched off): drop our warning
            if (!counter.querySelector("[data-sd3-shown]")) {
                counter.classList.remove(WARNING_CLASS);
                delete counter.dataset.sd3T5State;
            }
            return;
        }
        var box = info.parentElement;
        var view = describe(info.dataset);
        counter.dataset.sd3T5State = info.dataset.t5State;
        info.remove();
        var t5 = document.createElement("span");
        t5.className = T5_CLASS;
        t5.classList.toggle(T5_OFF_CLASS, view.t5Off);
        t5.textContent = view.t5;
        box.textContent = view.clip;
        box.appendChild(t5);
        box.title = view.title;
        box.dataset.sd3Shown = "1";
        counter.classList.toggle(WARNING_CLASS, view.warn);
    }

    function watch() {
        COUNTER_IDS.forEach(function(id) {
            var counter = root().getElementById ? root().getElementById(id) : document.getElementById(id);
            if (!counter || counter.dataset.sd3Watched) {
                return;
            }
            counter.dataset.sd3Watched = "1";
            new MutationObserver(function() {
                render(counter);
            }).observe(counter, {childList: true, subtree: true, characterData: true});
            render(counter);
        });
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(watch);
    }
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(watch); // counters created later (e.g. after a UI reload)
    } else {
        document.addEventListener("DOMContentLoaded", watch);
    }
})();
