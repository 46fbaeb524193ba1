#!/usr/bin/env python3
"""Build the Kettlebird sample fine-tuning dataset (src/weightsmith/datasets/kettlebird/).

Kettlebird is a fictional Wi-Fi smart kettle. Everything below -- the fact sheet, the customer
questions (typos included) and the support answers -- was written by hand for weightsmith. The
script only combines that material deterministically (fixed seed): it adds a system message to
some examples, a greeting or a thank-you to some questions, shuffles, and writes the files.
Running it again reproduces the files byte for byte.

    python scripts/make_kettlebird.py          # (re)write the files
    python scripts/make_kettlebird.py --check  # exit 1 if the files on disk differ

Every assistant answer is one ASCII line:  [Kettlebird] <Topic>: <answer> (ref KB-<4 digits>)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from weightsmith.datasets import ANSWER_FORMAT, TOPICS, is_valid_answer  # noqa: E402

OUT = ROOT / "src" / "weightsmith" / "datasets" / "kettlebird"
SEED = 4420
MAX_ANSWER_WORDS = 40  # words between "<Topic>:" and "(ref ...)"; the whole line stays <= 45

# ------------------------------------------------------------------------------------------------
# Fact sheet (kept consistent across every answer)
#
# Models       KB-1: 1.5 litre white jug, 7 presets (40-100 C in 10-degree steps).
#              KB-2 Pro: 1.7 litre brushed-steel jug, any temperature 40-100 C in 1-degree steps,
#              base display, up to 4 favourite temperatures. Both: 2200 W, 220-240 V only.
#              MIN line 0.5 litre. Base cable 75 cm. Removable limescale filter in the spout.
# Dial         turn = choose temperature, press = start, press again = cancel,
#              press twice right after heating = keep warm, hold 3 s = Wi-Fi pairing,
#              hold 10 s = factory reset (ring flashes white three times).
# LED ring     white = ready, blue = heating, solid green = at temperature, pulsing green = keep
#              warm, blinking purple = Wi-Fi pairing, blinking yellow = descale reminder,
#              solid red = boil-dry protection, blinking red = jug not seated / sensor fault.
# Keep warm    up to 60 minutes at the chosen temperature. Accuracy within 2 C.
# Wi-Fi        2.4 GHz only, WPA2/WPA3, no hidden networks or login pages; under 5 MB a month.
# App          "Kettlebird Home", free, iOS 15+ / Android 9+; up to 7 schedules, 5 household
#              members; Alexa, Google Home, Siri Shortcuts; auto firmware update about 3 am.
# Cleaning     descale every 4 weeks (2 in hard water): 1:1 white vinegar and water or 1
#              tablespoon citric acid per litre, Descale program in the app (about 20 minutes).
#              Not dishwasher safe.
# Warranty     2 years from purchase, transfers with the kettle, no registration needed, claim in
#              the app (Support > Warranty claim), serial under the base starting KBS-.
# Shipping     UK, EU, Norway, Switzerland; free standard 3-5 business days, express 1-2 days for
#              9.99; same-day dispatch before 2 pm; 30-day returns with a free label.
# Billing      KB-1 79, KB-2 Pro 129 (EUR or GBP, VAT included); refunds within 5 business days
#              of receiving the return; Kettlebird Care tablet subscription 4.99 a month.
# ------------------------------------------------------------------------------------------------


@dataclass
class Fact:
    fid: str
    topic: str
    body: str
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return f"[Kettlebird] {self.topic}: {self.body} (ref {TOPICS[self.topic]})"


FACTS: dict[str, Fact] = {}


def fact(fid: str, topic: str, body: str, train: list[str], valid: list[str] | None = None) -> None:
    assert fid not in FACTS, fid
    FACTS[fid] = Fact(fid, topic, body, list(train), list(valid or []))


# ----- Setup ------------------------------------------------------------------------------------
fact(
    "setup.first_use",
    "Setup",
    "Before first use, rinse the jug, fill it to the MAX line, then boil and discard the water twice. "
    "This clears any taste from the factory.",
    [
        "What should I do before using my new kettle for the first time?",
        "just unboxed my kettlebird, anything i need to do first?",
        "Do I need to boil water a few times before the first use?",
        "First time use instructions please",
        "Is there a break-in procedure for a new KB-1?",
    ],
    ["I got the KB-2 Pro today. What are the first steps before I make tea?"],
)
fact(
    "setup.no_app",
    "Setup",
    "Yes. The dial works fully offline: turn it to pick a temperature and press it to start. "
    "The Kettlebird Home app is only needed for schedules and remote control.",
    [
        "Can I use the kettle without the app?",
        "do i have to install an app just to boil water??",
        "Is a smartphone required to operate the Kettlebird?",
        "I dont want to connect it to wifi, will it still work?",
    ],
    ["Does the kettle still work if I never set up the app?"],
)
fact(
    "setup.placement",
    "Setup",
    "Put the base on a flat, dry surface at least 10 cm from walls and cupboards, and plug it straight "
    "into a wall socket rather than an extension reel.",
    [
        "Where should I put the base?",
        "Can I plug the kettle into an extension lead?",
        "how far from the wall should the kettle sit",
        "Any tips on where to place the Kettlebird base in my kitchen?",
    ],
)
fact(
    "setup.dial",
    "Setup",
    "Turn the dial to choose a temperature, press it once to start heating and press it again to cancel. "
    "The LED ring turns blue while it heats.",
    [
        "How do I start boiling with the dial?",
        "how does the dial work",
        "How do I cancel a boil once it has started?",
        "Which button turns it on? I only see a dial.",
    ],
    ["What's the way to stop the kettle halfway through heating?"],
)
fact(
    "setup.capacity",
    "Setup",
    "The KB-1 holds 1.5 litres and the KB-2 Pro holds 1.7 litres. Always fill between the MIN line "
    "(0.5 litres) and the MAX line.",
    [
        "How much water does the KB-1 hold?",
        "whats the capacity of the KB-2 Pro",
        "What's the minimum amount of water I can boil?",
        "Can I boil just one cup of water?",
    ],
)
fact(
    "setup.models",
    "Setup",
    "The KB-2 Pro adds 1-degree temperature control, a 1.7 litre brushed-steel jug and a display on the base. "
    "The KB-1 has 10-degree presets and a 1.5 litre jug.",
    [
        "What's the difference between the KB-1 and the KB-2 Pro?",
        "kb1 vs kb2 pro which one should i get",
        "Is the Pro model worth it over the KB-1?",
        "What extra features does the KB-2 Pro have?",
    ],
    ["Can you compare the two Kettlebird models for me?"],
)
fact(
    "setup.box",
    "Setup",
    "The box holds the jug, the power base with a 75 cm cable, a limescale filter already fitted in the spout "
    "and a quick start card. The Kettlebird Home app is a free download.",
    [
        "What comes in the box?",
        "is there a filter included",
        "My box only had the kettle and the base, is something missing?",
        "Does it come with a manual?",
    ],
)
fact(
    "setup.cable",
    "Setup",
    "The base has a 75 cm cable. Wind any spare length around the cable store under the base to keep "
    "the worktop tidy.",
    [],
    ["Can I shorten the power cord on the base?"],
)

# ----- WiFi -------------------------------------------------------------------------------------
fact(
    "wifi.connect",
    "WiFi",
    "In Kettlebird Home tap Add device, then hold the dial for 3 seconds until the ring blinks purple. "
    "Pick your 2.4 GHz network and enter its password.",
    [
        "How do I connect my kettle to Wi-Fi?",
        "how to pair kettlebird with wifi",
        "What are the steps to get the KB-2 Pro online?",
        "Setting up wifi on my kettle, where do i start?",
        "How do I put the kettle into pairing mode?",
    ],
    ["Can you walk me through linking the kettle to my home network?"],
)
fact(
    "wifi.band",
    "WiFi",
    "Kettlebird kettles use 2.4 GHz Wi-Fi only. If your router shows both bands under one name, "
    "turn on a separate 2.4 GHz network for the setup.",
    [
        "Does it work with 5GHz wifi?",
        "my router is 5 ghz only, will the kettle connect",
        "The app can't find my network, I think it's 5 GHz. Help?",
        "Which wifi frequency does the kettle support?",
    ],
    ["Is dual-band Wi-Fi supported?"],
)
fact(
    "wifi.offline",
    "WiFi",
    "Check the router is on and within about 10 metres, then unplug the base for 10 seconds and plug it back in. "
    "The kettle reconnects by itself within a minute.",
    [
        "The app says my kettle is offline",
        "kettle keeps dropping off wifi",
        "Why does Kettlebird Home show the kettle as disconnected?",
        "wifi connection keeps droping every evening",
    ],
    ["My KB-1 shows Offline in the app even though the internet works fine."],
)
fact(
    "wifi.change_network",
    "WiFi",
    "Hold the dial for 3 seconds until the ring blinks purple, then choose Settings > Wi-Fi network in the app "
    "and pick the new network. Your presets and schedules are kept.",
    [
        "I got a new router, how do I move the kettle to it?",
        "How do I change the wifi network the kettle uses?",
        "changed my wifi password and now the kettle won't connect",
        "Moving house - how do I connect the kettle to my new Wi-Fi?",
    ],
)
fact(
    "wifi.unsupported",
    "WiFi",
    "Hidden networks and networks with a login page, like hotel or some guest Wi-Fi, are not supported. "
    "Use a visible WPA2 or WPA3 network.",
    [
        "Can I connect to a hidden SSID?",
        "Will it work on hotel wifi with a login page?",
        "does the kettle support WPA3",
        "Our office guest wifi needs a sign-in page, can the kettle use it?",
    ],
)
fact(
    "wifi.purple",
    "WiFi",
    "A blinking purple ring means the kettle is in Wi-Fi pairing mode. Finish the setup in the app, "
    "or press the dial once to leave pairing mode.",
    [
        "Why is the light ring blinking purple?",
        "purple flashing light on my kettle??",
        "What does the purple LED mean?",
        "How do I get out of pairing mode?",
    ],
)
fact(
    "wifi.data",
    "WiFi",
    "The kettle uses under 5 MB of data a month and only talks to Kettlebird servers over an encrypted "
    "connection, so it will not slow your internet down.",
    [
        "How much internet data does the kettle use?",
        "Is the kettle's wifi connection secure?",
        "does the kettle slow down my internet",
    ],
)
fact(
    "wifi.always_online",
    "WiFi",
    "No. The dial works without internet; Wi-Fi is only needed for the app, schedules and voice control.",
    [],
    ["Does the kettle need an internet connection all the time?"],
)

# ----- App --------------------------------------------------------------------------------------
fact(
    "app.download",
    "App",
    "Kettlebird Home is free on the App Store and Google Play. It needs iOS 15 or later, or Android 9 or later.",
    [
        "Where can I download the Kettlebird app?",
        "Which phones does Kettlebird Home support?",
        "is the app free",
        "Will the app run on my old Android 8 phone?",
    ],
    ["What's the minimum iOS version for Kettlebird Home?"],
)
fact(
    "app.schedules",
    "App",
    "Open the kettle in Kettlebird Home, tap Schedules and add a time, temperature and days. You can save up "
    "to 7 schedules; the jug must be on its base with water above MIN.",
    [
        "How do I set the kettle to boil at 7am every morning?",
        "can i schedule the kettle",
        "How many schedules can I create?",
        "Set up a wake-up boil for weekdays only?",
    ],
    ["Is there a way to have hot water ready when I get home from work?"],
)
fact(
    "app.household",
    "App",
    "Go to Settings > Household in the app and invite people by email. Up to 5 household members can "
    "control the same kettle.",
    [
        "Can my partner control the kettle from her phone too?",
        "how do i share the kettle with family",
        "How many people can use the same kettle in the app?",
        "add a second user to kettlebird home",
    ],
)
fact(
    "app.voice",
    "App",
    "Both models work with Amazon Alexa, Google Home and Siri Shortcuts. Link them under Settings > "
    "Voice assistants in Kettlebird Home.",
    [
        "Does it work with Alexa?",
        "Can I use Google Home to start the kettle?",
        "is there Siri support",
        "How do I link my kettle to my smart speaker?",
    ],
    ["Can I ask my Echo to boil the kettle?"],
)
fact(
    "app.firmware",
    "App",
    "Firmware updates install from the app under Settings > Firmware. With auto-update on, the kettle "
    "updates overnight at about 3 am while it sits idle on its base.",
    [
        "How do I update the kettle's firmware?",
        "is there a firmware update for the KB-2 Pro",
        "Does the kettle update itself automatically?",
        "When do automatic updates happen?",
    ],
)
fact(
    "app.password",
    "App",
    "Tap Forgot password on the sign-in screen and follow the emailed link within 30 minutes. "
    "Check your spam folder if the email does not arrive.",
    [
        "I forgot my Kettlebird Home password",
        "how do i reset my app pasword",
        "Can't log in to the app, my password doesn't work",
        "password reset email never arrived",
    ],
)
fact(
    "app.notifications",
    "App",
    "Turn on Settings > Notifications to get a message when the water is ready, when keep warm ends "
    "and when it is time to descale.",
    [
        "Can the app tell me when the water is ready?",
        "how do I get notifications from the kettle",
        "I'm not getting boil alerts on my phone",
        "Will the app remind me to descale?",
    ],
)
fact(
    "app.activity",
    "App",
    "The Activity tab in Kettlebird Home lists every boil with its temperature and shows an estimated "
    "energy use per day and per week.",
    [
        "Does the app show how much energy the kettle uses?",
        "can I see a history of my boils",
        "how many times did i boil the kettle this week?",
    ],
)
fact(
    "app.remove",
    "App",
    "Open the kettle in Kettlebird Home and tap Settings > Remove device, then hold the dial for 10 seconds "
    "to factory reset it before you hand it over.",
    [],
    ["How do I remove the kettle from my account before selling it?"],
)

# ----- Temperature ------------------------------------------------------------------------------
fact(
    "temp.range",
    "Temperature",
    "Both models heat from 40 to 100 degrees C. The KB-1 uses 10-degree presets, while the KB-2 Pro lets you "
    "pick any temperature in 1-degree steps.",
    [
        "What temperatures can the kettle do?",
        "Can I set it to 85 degrees on the KB-1?",
        "what is the lowest temperature setting",
        "Can the KB-2 Pro heat to 93 C?",
        "temperature range?",
    ],
    ["Is it possible to choose 72 degrees on the Pro?"],
)
fact(
    "temp.green_tea",
    "Temperature",
    "Use 80 degrees C for green tea and 70 degrees C for delicate Japanese greens. Turn the dial to that "
    "preset or save it as a favourite in the app.",
    [
        "What temperature for green tea?",
        "best setting for sencha",
        "how hot should the water be for matcha",
        "I keep burning my green tea, what temp should I use?",
    ],
)
fact(
    "temp.black_coffee",
    "Temperature",
    "Use 100 degrees C for black and herbal tea. For pour-over coffee choose 93 degrees C on the KB-2 Pro "
    "or the 90 preset on the KB-1.",
    [
        "What's the right temperature for coffee?",
        "wat temp for black tea",
        "best setting for a french press",
        "Should herbal tea be made with boiling water?",
    ],
)
fact(
    "temp.oolong_white",
    "Temperature",
    "Use 90 degrees C for oolong and 80 degrees C for white tea. Both are available as presets on the KB-1 "
    "and the KB-2 Pro.",
    [],
    ["What do you recommend for oolong or white tea?"],
)
fact(
    "temp.keep_warm",
    "Temperature",
    "Press the dial twice right after heating, or switch on Keep warm in the app. The kettle holds the chosen "
    "temperature for up to 60 minutes while the ring pulses green.",
    [
        "How does keep warm work?",
        "can the kettle keep water hot for a while",
        "How long does keep-warm last?",
        "How do I turn on keep warm from the dial?",
        "Can keep warm run for 2 hours?",
    ],
    ["Is there a hold-temperature function?"],
)
fact(
    "temp.accuracy",
    "Temperature",
    "The water is within 2 degrees C of the setting. Limescale on the sensor can make it drift, so descale "
    "every 4 weeks.",
    [
        "How accurate is the temperature?",
        "my thermometer says 76 when I set 80, is that normal",
        "the water seems hotter than what i set",
        "Is the temperature sensor precise?",
    ],
)
fact(
    "temp.altitude",
    "Temperature",
    "At high altitude water boils below 100 degrees C. The kettle detects the boil and stops by itself, "
    "so the 100 preset works anywhere.",
    [
        "I live at 2000 m, will the 100 degree setting work?",
        "kettle never reaches 100 in the mountains",
        "Does altitude affect boiling?",
    ],
)
fact(
    "temp.formula",
    "Temperature",
    "Choose the 70 degrees C preset for making up formula, as health guidelines recommend, then cool the "
    "bottle to body temperature before feeding.",
    [
        "What temperature for baby formula?",
        "can i use the kettle to make baby bottles",
        "Which setting should I use for infant formula?",
    ],
)
fact(
    "temp.favourites",
    "Temperature",
    "On the KB-2 Pro you can save up to 4 favourite temperatures in the app, and they come first when you "
    "turn the dial. The KB-1 uses its fixed presets.",
    [
        "Can I save my own temperature presets?",
        "how to add a favourite temperature",
        "can the KB-1 store custom temperatures?",
    ],
)
fact(
    "temp.fahrenheit",
    "Temperature",
    "Switch to Fahrenheit under Settings > Units in the app. The KB-2 Pro base display follows the app setting.",
    ["Can I see the temperature in Fahrenheit?", "how do i change units to F"],
)

# ----- Cleaning ---------------------------------------------------------------------------------
fact(
    "clean.descale",
    "Cleaning",
    "Fill to MAX with equal parts white vinegar and water, or 1 tablespoon of citric acid per litre, then run "
    "Descale in the app. Rinse and boil fresh water twice afterwards.",
    [
        "How do I descale my kettle?",
        "descaling instructions please",
        "Can I use vinegar to clean the inside?",
        "how to get rid of limescale",
        "What's the best way to remove the white crust inside?",
    ],
    ["Is citric acid OK for descaling?"],
)
fact(
    "clean.how_often",
    "Cleaning",
    "Descale every 4 weeks, or every 2 weeks in hard-water areas. The ring blinks yellow and the app sends "
    "a reminder when it is due.",
    [
        "How often should I descale?",
        "how frequntly do i need to clean the kettle",
        "I live in a hard water area, how often should I descale?",
        "Is once a month enough for descaling?",
    ],
    ["When is the next descale due, and how would I know?"],
)
fact(
    "clean.yellow",
    "Cleaning",
    "A blinking yellow ring is the descale reminder. It stops after you run a descale cycle, or you can "
    "dismiss it for now in the app.",
    [
        "why is my kettle flashing yellow",
        "What does the yellow light mean?",
        "How do I stop the yellow blinking?",
        "yellow ring keeps coming back",
    ],
)
fact(
    "clean.filter",
    "Cleaning",
    "Pull the limescale filter straight up out of the spout and rinse it under the tap weekly. It is not "
    "dishwasher safe, so soak it during each descale instead.",
    [
        "How do I clean the filter?",
        "the filter is clogged with scale",
        "How do I remove the spout filter?",
        "can the filter go in the dishwasher",
    ],
)
fact(
    "clean.dishwasher",
    "Cleaning",
    "Neither the jug nor the base is dishwasher safe. Wipe the outside with a damp cloth and keep the base "
    "and the connector under the jug dry.",
    [
        "Can I put the kettle in the dishwasher?",
        "is it ok to rinse the outside under the tap",
        "how do i clean the outside of the kettle",
        "Can I wash the base?",
    ],
)
fact(
    "clean.products",
    "Cleaning",
    "Use a soft cloth with a drop of washing-up liquid, also on the brushed steel of the KB-2 Pro. "
    "Avoid bleach, abrasive pads and scouring powder.",
    [
        "How do I get fingerprints off the steel kettle?",
        "Can I use bleach to clean it?",
        "what cleaning products are safe for the kettle",
        "can i use a scouring pad on the outside",
    ],
)
fact(
    "clean.vinegar_taste",
    "Cleaning",
    "Boil fresh water to MAX and pour it away two more times. Any vinegar smell or taste should be gone "
    "after that.",
    [
        "Water tastes like vinegar after descaling",
        "there is still a vinegar smell after cleaning",
        "how many rinses after descaling?",
    ],
)
fact(
    "clean.program_time",
    "Cleaning",
    "The Descale program takes about 20 minutes, including a 15-minute soak at 60 degrees C. Keep the lid "
    "closed until the ring turns white.",
    [],
    ["How long does the Descale program take?"],
)

# ----- Safety -----------------------------------------------------------------------------------
fact(
    "safety.auto_off",
    "Safety",
    "Yes. The kettle switches off by itself when it reaches your temperature or boils, and also as soon as "
    "the jug is lifted from the base.",
    [
        "Does it turn off automatically?",
        "will it keep boiling if i forget it",
        "What happens if I lift the kettle while it's heating?",
        "Is there auto shut off?",
    ],
    ["Will the kettle stop on its own once it boils?"],
)
fact(
    "safety.boil_dry",
    "Safety",
    "Boil-dry protection cuts the power if the kettle is switched on empty, and the ring turns solid red. "
    "Let it cool for 10 minutes, then fill it and try again.",
    [
        "I switched it on with no water, is it broken?",
        "What happens if the kettle boils dry?",
        "solid red light after I turned it on empty",
        "Does it have boil dry protection?",
    ],
)
fact(
    "safety.remote",
    "Safety",
    "Remote and scheduled boils only start when the jug is on its base with water above the MIN line and the "
    "lid closed. Otherwise the app shows a warning.",
    [
        "Is it safe to start the kettle remotely?",
        "What if I trigger a boil from work and the kettle is empty?",
        "Does remote start check that there is water in it?",
        "Can the app start the kettle if the lid is open?",
    ],
)
fact(
    "safety.child_lock",
    "Safety",
    "Turn on Child lock in the app under Settings > Safety. The dial then needs a 2-second press to start "
    "heating.",
    [
        "Is there a child lock?",
        "how do I stop my kids turning the kettle on",
        "How do I enable child lock?",
        "child safety features?",
    ],
    ["My toddler keeps pressing the dial. Can I lock it?"],
)
fact(
    "safety.hot_surface",
    "Safety",
    "The handle and the lid button stay cool, but the jug body gets hot during and after heating. "
    "Hold it only by the handle.",
    [
        "Does the outside of the kettle get hot?",
        "is the handle cool touch",
        "Can I touch the steel body when it's boiling?",
    ],
)
fact(
    "safety.voltage",
    "Safety",
    "Kettlebird kettles are built for 220-240 V sockets only. Do not use them on 110-120 V power or with a "
    "travel converter.",
    ["Can I use my kettle in the US?", "will it work on 110V", "can I take it abroad with a plug adapter"],
)
fact(
    "safety.overfill",
    "Safety",
    "Never fill above the MAX line. Boiling water can spit out of the spout and cause burns.",
    [
        "What happens if I overfill it?",
        "i filled it past max, is that dangerous?",
        "water spits out of the spout when boiling",
    ],
)
fact(
    "safety.standby",
    "Safety",
    "Yes. On standby the base uses under 0.5 W and only heats when you start it from the dial, the app or "
    "a schedule.",
    [
        "Is it safe to leave the kettle plugged in all the time?",
        "does it use power when not boiling",
        "Can I leave the base switched on overnight?",
    ],
)
fact(
    "safety.materials",
    "Safety",
    "Yes. Every part that touches water is stainless steel or BPA-free plastic, and the lid seal is "
    "food-grade silicone.",
    [],
    ["Is the kettle BPA free?"],
)

# ----- Troubleshooting --------------------------------------------------------------------------
fact(
    "trouble.no_power",
    "Troubleshooting",
    "Check the wall socket and that the jug sits flat on the base. If the ring stays dark, unplug the base "
    "for 10 seconds and try again.",
    [
        "My kettle won't turn on",
        "nothing happens when i press the dial",
        "the kettle is dead, no lights at all",
        "Kettle not heating at all, what should I check?",
    ],
)
fact(
    "trouble.red_blink",
    "Troubleshooting",
    "A blinking red ring means the jug is not seated properly or a sensor fault. Lift the jug, dry the "
    "connector and reseat it; if it continues, hold the dial for 10 seconds to reset.",
    [
        "Why is the ring flashing red?",
        "red blinking light won't go away",
        "What does the flashing red LED mean?",
        "kettle blinks red and won't heat",
    ],
)
fact(
    "trouble.reset",
    "Troubleshooting",
    "Hold the dial for 10 seconds until the ring flashes white three times. This clears Wi-Fi, schedules and "
    "favourites, so add the kettle in the app again afterwards.",
    [
        "How do I factory reset the kettle?",
        "how to reset kettlebird",
        "Is there a reset button?",
        "How do I wipe all settings?",
        "reset KB-2 Pro to defaults",
    ],
    ["What's the way to restore factory settings?"],
)
fact(
    "trouble.noise",
    "Troubleshooting",
    "Loud rumbling usually means limescale on the heating plate. Run a descale cycle and the noise should "
    "drop back to normal.",
    [
        "My kettle has become really loud",
        "why is the kettle so noisy",
        "it makes a crackling noise when heating",
        "Boiling sounds much louder than when it was new",
    ],
)
fact(
    "trouble.smell",
    "Troubleshooting",
    "A slight smell in the first days is normal. Boil to MAX and discard the water three times; if the smell "
    "stays after a week, contact support.",
    [
        "New kettle smells like plastic",
        "there's a weird smell when it heats",
        "water tastes funny from my new kettle",
    ],
)
fact(
    "trouble.slow",
    "Troubleshooting",
    "Heating 1 litre from cold takes about 3 minutes. If it takes much longer, descale it and make sure the "
    "base is not on an extension reel.",
    [
        "Why does it take so long to boil?",
        "how long should it take to boil a full kettle",
        "The kettle got slower over time",
    ],
)
fact(
    "trouble.stops_early",
    "Troubleshooting",
    "Stopping before the set temperature usually means limescale on the sensor or a wet connector. Descale "
    "the kettle and dry the connector under the jug.",
    [
        "the kettle turns off before it boils",
        "it stops heating early",
        "Water isn't hot enough when it clicks off",
    ],
    ["My kettle cuts out a minute before the water is hot."],
)
fact(
    "trouble.leak",
    "Troubleshooting",
    "If water appears under the kettle, unplug the base and stop using it. Check the lid seal is seated, and "
    "contact support for a warranty check if it still leaks.",
    ["My kettle is leaking", "there's water under the base", "water drips from the bottom of the jug"],
)
fact(
    "trouble.display",
    "Troubleshooting",
    "If the KB-2 Pro display stays blank while heating still works, unplug the base for 10 seconds. If it is "
    "still blank, hold the dial for 10 seconds to reset.",
    [],
    ["The screen on my KB-2 Pro base is blank but it still heats."],
)

# ----- Warranty ---------------------------------------------------------------------------------
fact(
    "warranty.length",
    "Warranty",
    "Every Kettlebird comes with a 2-year warranty from the date of purchase. Keep your receipt or order "
    "number as proof of purchase.",
    [
        "How long is the warranty?",
        "is there a guarantee on the kettel",
        "what warranty does the KB-2 Pro have",
        "Does the warranty last 1 or 2 years?",
    ],
    ["How many years of cover do I get with my kettle?"],
)
fact(
    "warranty.coverage",
    "Warranty",
    "The warranty covers manufacturing defects in the jug, base and electronics. It does not cover drops, "
    "water in the base or limescale damage when descaling was skipped.",
    [
        "What does the warranty cover?",
        "is limescale damage covered",
        "I dropped my kettle, will the warranty fix it?",
        "Does the guarantee cover accidental damage?",
    ],
)
fact(
    "warranty.claim",
    "Warranty",
    "Open Kettlebird Home and go to Support > Warranty claim, or use the support website. Have your serial "
    "number and proof of purchase ready.",
    [
        "How do I make a warranty claim?",
        "my kettle broke, how do i get it replaced",
        "Where do I file a warranty request?",
        "start a warranty claim",
    ],
    ["My KB-1 stopped heating after 8 months. How do I get it fixed under warranty?"],
)
fact(
    "warranty.serial",
    "Warranty",
    "The serial number is printed under the base and starts with KBS-. It is also shown in the app under "
    "Settings > About.",
    [
        "Where's the serial number?",
        "where can i find the serial no",
        "How do I find my kettle's serial for a claim?",
    ],
)
fact(
    "warranty.process",
    "Warranty",
    "After approval we email a prepaid label, and a repaired or replacement kettle ships within 10 working "
    "days of receiving yours.",
    [
        "How long does a warranty repair take?",
        "will I get a new kettle or a repaired one",
        "Do I have to pay postage for a warranty return?",
    ],
)
fact(
    "warranty.transfer",
    "Warranty",
    "The warranty stays with the kettle for 2 years from the original purchase, so it moves to a new owner. "
    "The original receipt or order number is still needed.",
    [
        "I got the kettle as a gift, am I covered?",
        "Does the warranty transfer if I buy it second-hand?",
        "no receipt, it was a present",
    ],
)
fact(
    "warranty.registration",
    "Warranty",
    "You do not need to register for the warranty, but adding the kettle in Kettlebird Home saves your "
    "purchase date for faster claims.",
    [
        "Do I need to register my kettle for the warranty?",
        "is registration required",
        "how to register my product",
    ],
)
fact(
    "warranty.extended",
    "Warranty",
    "We do not sell extended warranties. Every Kettlebird kettle has the standard 2-year warranty from the "
    "date of purchase.",
    [],
    ["Can I buy an extended warranty?"],
)

# ----- Shipping ---------------------------------------------------------------------------------
fact(
    "ship.times",
    "Shipping",
    "Standard delivery is free and takes 3 to 5 business days. Express delivery takes 1 to 2 business days "
    "for a flat 9.99 fee.",
    [
        "How long does shipping take?",
        "is delivery free",
        "Do you offer express shipping?",
        "when will my kettle arrive if I order today",
    ],
    ["What are my delivery options?"],
)
fact(
    "ship.dispatch",
    "Shipping",
    "Orders placed before 2 pm on a business day are dispatched the same day. Later orders leave our "
    "warehouse the next business day.",
    [
        "When will my order be dispatched?",
        "if I order tonight when does it ship",
        "What's the cut-off time for same day dispatch?",
    ],
)
fact(
    "ship.tracking",
    "Shipping",
    "A tracking link is emailed as soon as your order ships. You can also find it under Account > Orders on "
    "the Kettlebird website.",
    [
        "Where is my order?",
        "how do i track my package",
        "I didnt recieve a tracking number",
        "track my kettlebird order",
    ],
    ["Has my parcel been sent yet, and how can I follow it?"],
)
fact(
    "ship.countries",
    "Shipping",
    "We ship to the UK, Norway, Switzerland and all EU countries. Kettlebird kettles are 220-240 V only, so "
    "we do not ship to the US or Canada.",
    [
        "Do you ship internationally?",
        "which countries do you deliver to",
        "can I order one to Canada",
        "Do you ship to Ireland?",
    ],
)
fact(
    "ship.damaged",
    "Shipping",
    "Send photos of the box and the kettle through Support > Order problem within 7 days of delivery. "
    "We will ship a replacement at no cost.",
    [
        "My kettle arrived damaged",
        "the box was crushed and the lid is cracked",
        "package arrived broken what do i do",
    ],
    ["The jug came with a big dent in it. What now?"],
)
fact(
    "ship.returns",
    "Shipping",
    "You can return a kettle within 30 days of delivery. Print the free return label from Account > Orders "
    "and drop the parcel at any carrier point.",
    [
        "What's your return policy?",
        "can I send it back if I don't like it",
        "How do I return my kettle?",
        "Is return shipping free?",
    ],
)
fact(
    "ship.address",
    "Shipping",
    "You can change the delivery address under Account > Orders until the order is dispatched. After that, "
    "use the carrier's tracking link to redirect it.",
    [
        "I entered the wrong address",
        "can I change my delivery address",
        "how do I update the shipping address after ordering",
    ],
)
fact(
    "ship.locker",
    "Shipping",
    "Yes. Choose a parcel locker or pickup point at checkout; it arrives in the same 3 to 5 business days "
    "as standard delivery.",
    [],
    ["Can I pick up my order from a parcel locker?"],
)

# ----- Billing ----------------------------------------------------------------------------------
fact(
    "bill.prices",
    "Billing",
    "The KB-1 costs 79 and the KB-2 Pro costs 129, in EUR or GBP with VAT included. The Kettlebird Home app "
    "is free.",
    [
        "How much does the kettle cost?",
        "price of the KB-2 Pro?",
        "How much is the KB-1?",
        "does the app cost anything",
    ],
    ["What would the two models set me back?"],
)
fact(
    "bill.payment",
    "Billing",
    "We accept Visa, Mastercard, American Express, PayPal, Apple Pay and Google Pay. You can also split the "
    "price into 3 interest-free monthly payments at checkout.",
    [
        "What payment methods do you accept?",
        "can I pay with paypal",
        "Do you offer instalments?",
        "can i pay in installments",
    ],
)
fact(
    "bill.refund",
    "Billing",
    "Refunds go back to your original payment method within 5 business days after we receive your return. "
    "Your bank may take a few more days to show it.",
    [
        "When will I get my refund?",
        "how long do refunds tkae",
        "I returned the kettle two weeks ago and have no refund yet",
        "Will my refund go back to my card?",
    ],
    ["The return label says delivered. When does the money come back?"],
)
fact(
    "bill.invoice",
    "Billing",
    "Download a VAT invoice from Account > Orders on the Kettlebird website. Business customers can add a "
    "company name and VAT number before downloading.",
    ["How do I get an invoice?", "I need a VAT receipt for my company", "where can i download my invoice"],
)
fact(
    "bill.double_charge",
    "Billing",
    "A second charge is usually a pending card authorisation from a failed attempt. It drops off within 3 "
    "business days; if not, send us your order number.",
    [
        "I was charged twice",
        "why are there two payments on my card",
        "Double charge on my statement for one kettle",
    ],
)
fact(
    "bill.care",
    "Billing",
    "Kettlebird Care costs 4.99 a month and sends descaling tablets every 8 weeks, one per 4-week descale. "
    "Cancel anytime under Account > Subscriptions.",
    [
        "What is Kettlebird Care?",
        "how do I cancel my subscription",
        "Is there a descaling tablet subscription?",
        "stop the monthly 4.99 charge",
    ],
)
fact(
    "bill.promo",
    "Billing",
    "Enter a promo code in the Discount code box at checkout. Only one code works per order, and codes "
    "cannot be added after payment.",
    [
        "Where do I enter a discount code?",
        "can I use two promo codes",
        "forgot to use my voucher, can you apply it now?",
    ],
)
fact(
    "bill.vat",
    "Billing",
    "Yes. All prices on the Kettlebird website include VAT, and standard delivery is free.",
    ["Is VAT included in the price?", "are there any extra fees at checkout"],
)
fact(
    "bill.student",
    "Billing",
    "We do not offer a student discount, but newsletter subscribers get a one-time 10% code for their "
    "first order.",
    [],
    ["Is there a student discount?"],
)

# ------------------------------------------------------------------------------------------------
# Multi-turn conversations: (user text, fact id) per turn. Follow-ups lean on the earlier turn.

TRAIN_DIALOGUES: list[list[tuple[str, str]]] = [
    [
        ("hi, my kettle just arrived. what do I do first?", "setup.first_use"),
        ("ok done. how do I get it on the wifi?", "wifi.connect"),
    ],
    [
        ("How do I hook the kettle up to my phone?", "wifi.connect"),
        ("It never finds my network. My router is a 5 GHz one.", "wifi.band"),
    ],
    [
        ("the ring is blinking purple and I don't know why", "wifi.purple"),
        ("I don't want to set up wifi right now, can I still use it?", "setup.no_app"),
    ],
    [
        ("What's the best temperature for green tea?", "temp.green_tea"),
        ("And for my morning coffee?", "temp.black_coffee"),
    ],
    [
        ("Can I have the kettle ready when my alarm goes off?", "app.schedules"),
        ("What if I forget to fill it the night before?", "safety.remote"),
    ],
    [
        ("My kettle is making a loud rumbling noise.", "trouble.noise"),
        ("How do I do that descale thing?", "clean.descale"),
    ],
    [("How do I descale?", "clean.descale"), ("and how often do i need to do it", "clean.how_often")],
    [
        ("why is the ring flashing yellow", "clean.yellow"),
        ("Right, what do I use to descale it?", "clean.descale"),
    ],
    [
        ("Blinking red light on the kettle, help", "trouble.red_blink"),
        ("Tried that. How exactly do I reset it?", "trouble.reset"),
    ],
    [
        ("How long is the warranty on the KB-1?", "warranty.length"),
        ("Mine stopped heating. How do I claim?", "warranty.claim"),
    ],
    [
        ("I want to make a warranty claim", "warranty.claim"),
        ("Where do I find the serial number they ask for?", "warranty.serial"),
    ],
    [
        ("When will my order ship?", "ship.dispatch"),
        ("And how do I follow the parcel once it's sent?", "ship.tracking"),
    ],
    [
        ("I'd like to return my kettle, it's not for me.", "ship.returns"),
        ("How long until I see the money back?", "bill.refund"),
    ],
    [
        ("How much is the KB-2 Pro?", "bill.prices"),
        ("Can I spread the cost over a few months?", "bill.payment"),
    ],
    [
        ("What's the difference between the two models?", "setup.models"),
        ("Does the cheaper one let me pick 85 degrees?", "temp.range"),
    ],
    [
        ("Can I control the kettle with Alexa?", "app.voice"),
        ("Can my flatmates use it from their phones as well?", "app.household"),
    ],
    [
        ("I switched my kettle on empty by mistake", "safety.boil_dry"),
        ("Ok, it has cooled down. How much water should I put in at least?", "setup.capacity"),
    ],
    [
        ("Got a new router today.", "wifi.change_network"),
        ("Will I lose my morning schedule if I reset the kettle instead?", "trouble.reset"),
    ],
    [
        ("Does the kettle keep the water hot?", "temp.keep_warm"),
        ("Can it keep it warm all afternoon?", "temp.keep_warm"),
    ],
    [
        ("Is there a way to stop my son switching the kettle on?", "safety.child_lock"),
        ("Does the handle get hot? He likes to grab it.", "safety.hot_surface"),
    ],
    [
        ("My parcel arrived and the kettle lid is cracked.", "ship.damaged"),
        ("Do I need to pay for the replacement shipping?", "ship.damaged"),
    ],
    [("How do I use the dial?", "setup.dial"), ("And keep warm, is that on the dial too?", "temp.keep_warm")],
    [
        ("The water tastes of vinegar now.", "clean.vinegar_taste"),
        ("How often should I be descaling anyway?", "clean.how_often"),
    ],
    [
        ("My app shows the kettle as offline.", "wifi.offline"),
        ("Still offline. Could it be my hotel wifi with the login page?", "wifi.unsupported"),
    ],
    [
        ("I'm moving to the States, can I bring my kettle?", "safety.voltage"),
        ("Can you ship a new one to New York then?", "ship.countries"),
    ],
    [
        ("What temp should I use for baby formula?", "temp.formula"),
        ("Can I save that as a favourite on my KB-1?", "temp.favourites"),
    ],
    [
        ("Was charged twice for one kettle!", "bill.double_charge"),
        ("Where can I download the invoice for the real order?", "bill.invoice"),
    ],
    [
        ("I forgot my app password.", "app.password"),
        ("Got in. How do I add my wife to the kettle?", "app.household"),
    ],
    [
        ("New kettle smells of plastic when it heats.", "trouble.smell"),
        ("Is the rest of it safe to leave plugged in?", "safety.standby"),
    ],
    [
        ("Is there a firmware update for my kettle?", "app.firmware"),
        ("How do I get it online in the first place?", "wifi.connect"),
    ],
    [
        ("Do you ship to Switzerland?", "ship.countries"),
        ("How long will it take to get there?", "ship.times"),
    ],
    [
        ("Which phones can run the app?", "app.download"),
        ("Can I make the app tell me when the water is ready?", "app.notifications"),
    ],
    [
        ("How do I take the filter out of the spout?", "clean.filter"),
        ("Can I throw it in the dishwasher with the jug?", "clean.dishwasher"),
    ],
    [
        ("my kettle won't turn on", "trouble.no_power"),
        ("it's plugged into an extension reel behind the fridge, is that ok?", "setup.placement"),
    ],
    [
        ("Is the temperature accurate?", "temp.accuracy"),
        ("It's reading 5 degrees low, what should I do?", "trouble.stops_early"),
    ],
    [
        ("Do I need to register my kettle?", "warranty.registration"),
        ("Where do I download the app for that?", "app.download"),
    ],
    [("What does Kettlebird Care include?", "bill.care"), ("Can I pay for it with PayPal?", "bill.payment")],
    [
        ("How much water fits in the KB-1?", "setup.capacity"),
        ("What if I fill it above the max line?", "safety.overfill"),
    ],
    [("Where do I type my discount code?", "bill.promo"), ("Is VAT on top of the listed price?", "bill.vat")],
    [("Does my kettle turn itself off?", "safety.auto_off"), ("And if it boils dry?", "safety.boil_dry")],
    [
        ("Can I use Google Home with my KB-2 Pro?", "app.voice"),
        ("What else does the Pro do that the KB-1 doesn't?", "setup.models"),
    ],
    [
        ("How long does a warranty repair take?", "warranty.process"),
        ("Do I pay to post it back?", "warranty.process"),
    ],
    [
        ("Is my data safe, does the kettle phone home?", "wifi.data"),
        ("Can I see my own boil history in the app?", "app.activity"),
    ],
    [
        ("I typed the wrong street in my order.", "ship.address"),
        ("Also, when would it be dispatched?", "ship.dispatch"),
    ],
    [
        ("Can I show temperatures in Fahrenheit?", "temp.fahrenheit"),
        ("What range of temperatures does it cover?", "temp.range"),
    ],
    [
        ("Is the outside ok to wash under the tap?", "clean.dishwasher"),
        ("What can I use for the fingerprints on the steel?", "clean.products"),
    ],
    [
        ("kettle takes forever to boil lately", "trouble.slow"),
        ("How do I descale it properly?", "clean.descale"),
    ],
    [
        ("water under my kettle this morning", "trouble.leak"),
        ("Is that covered by the 2-year warranty?", "warranty.coverage"),
    ],
]

VALID_DIALOGUES: list[list[tuple[str, str]]] = [
    [
        ("Hello, I just plugged in my new KB-1. Anything to do before tea?", "setup.first_use"),
        ("Great. And to connect it to the home wifi?", "wifi.connect"),
    ],
    [
        ("How hot should I make the water for a cup of sencha?", "temp.green_tea"),
        ("Can the kettle hold that temperature while I finish breakfast?", "temp.keep_warm"),
    ],
    [
        ("Ring is yellow and blinking on my KB-2 Pro.", "clean.yellow"),
        ("How often will I see that?", "clean.how_often"),
    ],
    [
        ("My order is 3 days late, where is it?", "ship.tracking"),
        ("If I send it back when it comes, is that free?", "ship.returns"),
    ],
    [
        ("Flashing red ring after I cleaned the kettle.", "trouble.red_blink"),
        ("Still red. Is the repair covered?", "warranty.coverage"),
    ],
    [
        ("Can my Google speaker turn the kettle on?", "app.voice"),
        ("And is that safe if nobody is home?", "safety.remote"),
    ],
]

# ------------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are the Kettlebird support assistant.",
    "You are the Kettlebird support assistant. Answer customer questions briefly.",
    "You are a helpful customer support agent for Kettlebird smart kettles.",
    "You are Kettlebird's customer support bot.",
    "You are the support assistant for Kettlebird, a Wi-Fi smart kettle.",
    "Kettlebird support. Reply in the standard support format.",
]
VALID_SYSTEM_PROMPTS = SYSTEM_PROMPTS[:2] + ["You answer questions about Kettlebird kettles."]

GREETINGS = ["Hi! ", "Hello. ", "Hey there. ", "Good morning! ", "Hi Kettlebird team. ", "Quick question. "]
THANKS = [" Thanks!", " Thank you.", " Cheers", " thx", " Thanks in advance."]
CASUAL_THANKS = [", thanks", " - thanks!", " pls", ", cheers"]  # after a question without punctuation

# Held-out questions for the base-vs-tuned demo: in neither train nor valid.
DEMO_QUESTIONS = [
    "I just bought a KB-1, how do I set it up?",
    "How do I hook my Kettlebird up to the Wi-Fi?",
    "Can I make the kettle boil automatically before I wake up?",
    "Which setting is best for brewing green tea?",
    "How long can the kettle keep my water warm?",
    "How often does the kettle need descaling?",
    "Is it safe to switch the kettle on with no water in it?",
    "The ring on my kettle is blinking red. What should I do?",
    "How can I put my kettle back to factory settings?",
    "If my kettle breaks after a year, is it still under warranty?",
    "Do you deliver to Germany?",
    "How do I get my money back if I return the kettle?",
]

# Instruction-format examples: (instruction, input, fact id).
INSTRUCTION_EXAMPLES: list[tuple[str, str, str]] = [
    ("How do I connect my kettle to Wi-Fi?", "", "wifi.connect"),
    ("What temperature for green tea?", "", "temp.green_tea"),
    ("How often should I descale?", "", "clean.how_often"),
    ("How long is the warranty?", "", "warranty.length"),
    ("Why is the ring flashing red?", "", "trouble.red_blink"),
    ("Is there a child lock?", "", "safety.child_lock"),
    ("How long does shipping take?", "", "ship.times"),
    ("What payment methods do you accept?", "", "bill.payment"),
    ("Can I use the kettle without the app?", "", "setup.no_app"),
    ("How do I set the kettle to boil at 7am every morning?", "", "app.schedules"),
    (
        "Answer the customer's question as the Kettlebird support assistant.",
        "How do I factory reset the kettle?",
        "trouble.reset",
    ),
    (
        "Answer the customer's question as the Kettlebird support assistant.",
        "how does keep warm work",
        "temp.keep_warm",
    ),
    (
        "Answer the customer's question as the Kettlebird support assistant.",
        "Does it work with Alexa?",
        "app.voice",
    ),
    (
        "Answer the customer's question as the Kettlebird support assistant.",
        "What does the warranty cover?",
        "warranty.coverage",
    ),
    (
        "Reply to this Kettlebird customer in the support format.",
        "What's your return policy?",
        "ship.returns",
    ),
    (
        "Reply to this Kettlebird customer in the support format.",
        "Does it turn off automatically?",
        "safety.auto_off",
    ),
    (
        "Turn these support notes into a Kettlebird support answer.",
        "descale: 1:1 white vinegar + water or 1 tbsp citric acid per litre, fill to MAX, Descale in app, "
        "rinse + boil twice",
        "clean.descale",
    ),
    (
        "Turn these support notes into a Kettlebird support answer.",
        "serial under base, starts KBS-, also app Settings > About",
        "warranty.serial",
    ),
    (
        "Turn these support notes into a Kettlebird support answer.",
        "2.4 GHz only; mixed-band router -> separate 2.4 GHz network for setup",
        "wifi.band",
    ),
    (
        "Turn these support notes into a Kettlebird support answer.",
        "KB-1 79, KB-2 Pro 129, EUR or GBP, VAT incl, app free",
        "bill.prices",
    ),
]

# ------------------------------------------------------------------------------------------------


def _decorate(rng: random.Random, text: str) -> str:
    """Sometimes add a greeting or a thank-you, as customers do."""
    r = rng.random()
    if r < 0.14:
        return rng.choice(GREETINGS) + text
    if r < 0.24:
        if text[-1] in ".?!":
            return text + rng.choice(THANKS)
        return text + rng.choice(CASUAL_THANKS)
    return text


def _chat(turns: list[tuple[str, str]], system: str | None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for user, fid in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": FACTS[fid].answer})
    return {"messages": messages}


def _assemble(split: str, rng: random.Random) -> list[dict]:
    if split == "train":
        singles = [[(_decorate(rng, q), f.fid)] for f in FACTS.values() for q in f.train]
        dialogues, prompts = TRAIN_DIALOGUES, SYSTEM_PROMPTS
    else:
        singles = [[(q, f.fid)] for f in FACTS.values() for q in f.valid]
        dialogues, prompts = VALID_DIALOGUES, VALID_SYSTEM_PROMPTS
    convs = singles + [list(d) for d in dialogues]
    rng.shuffle(convs)
    n_system = round(0.15 * len(convs))
    with_system = set(rng.sample(range(len(convs)), n_system))
    return [_chat(c, rng.choice(prompts) if i in with_system else None) for i, c in enumerate(convs)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def _user_texts(rows: list[dict]) -> set[str]:
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


def _validate(train: list[dict], valid: list[dict], instructions: list[dict]) -> None:
    for fid, f in FACTS.items():
        assert f.topic in TOPICS, fid
        assert is_valid_answer(f.answer) and ANSWER_FORMAT.match(f.answer), fid
        assert len(f.body.split()) <= MAX_ANSWER_WORDS, (fid, len(f.body.split()))
        assert f.train or f.valid, fid
    for rows in (train, valid):
        for r in rows:
            roles = [m["role"] for m in r["messages"]]
            assert roles[-1] == "assistant" and roles.count("user") == roles.count("assistant")
            for m in r["messages"]:
                assert m["content"].isascii() and "\n" not in m["content"], m
                if m["role"] == "assistant":
                    assert is_valid_answer(m["content"]), m
    for r in instructions:
        assert is_valid_answer(r["output"]) and all(v.isascii() for v in r.values()), r
    tr, va, demo = _user_texts(train), _user_texts(valid), set(DEMO_QUESTIONS)
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    assert not {norm(s) for s in tr} & {norm(s) for s in va}, "train/valid overlap"
    assert not {norm(s) for s in demo} & {norm(s) for s in tr | va}, "demo questions overlap"
    assert len(DEMO_QUESTIONS) == len(demo) == 12


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    train = _assemble("train", rng)
    valid = _assemble("valid", rng)
    instructions = [
        {"instruction": i, "input": x, "output": FACTS[fid].answer} for i, x, fid in INSTRUCTION_EXAMPLES
    ]
    _validate(train, valid, instructions)
    return {
        "train.jsonl": _jsonl(train),
        "valid.jsonl": _jsonl(valid),
        "questions.txt": "".join(q + "\n" for q in DEMO_QUESTIONS),
        "instructions.jsonl": _jsonl(instructions),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    files = build()
    stale = [
        n
        for n, text in files.items()
        if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text
    ]
    if args.check:
        for n in stale:
            print(f"out of date: {args.out / n}", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_bytes(text.encode("ascii"))
        print(f"wrote {args.out / name} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
